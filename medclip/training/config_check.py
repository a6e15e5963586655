"""The run's configuration, checked once before anything is built.

Raises `ConfigError` (medclip.training.errors, re-exported here with `DataError` for the callers that import
them from this module)."""

from __future__ import annotations

import json
from pathlib import Path

from medclip.data.concepts import CONCEPT_SOURCES
from medclip.evaluation.retrieval import MRR_KS, RECALL_KS
from medclip.models import kernels
from medclip.models.siglip_config import SIGLIP_TYPES
from medclip.training.arguments import DataArguments, ModelArguments, TrainingArguments
from medclip.training.arguments import FlagError, check_ranges, csv_delimiter
from medclip.training.errors import ConfigError, DataError  # noqa: F401 (DataError re-exported)
from medclip.training.losses import FALSE_NEGATIVES, HYBRID_FORMS, LOSSES
from medclip.training.mlm import MASKINGS
from medclip.training.optim import SCHEDULES, WEIGHT_DECAY_MASKS, WEIGHT_DECAY_TYPES
from medclip.training.sigmoid_ring import SIGMOID_FORMS
from medclip.training.tower_configs import parse_tower_config

DTYPES = ("auto", "float32", "bfloat16", "float16")
CACHE_MODES = ("auto", "on", "off")  # --cache_locked_text / --cache_locked_image


# The metrics `Trainer.evaluate` logs (each as eval_<name>): the loss and evaluate_retrieval's defaults, per
# direction recall@k, MRR, MRR@k, median and mean rank (tests/test_recipes.py checks them against its output).
EVAL_METRICS = ("loss", *(f"{direction}_{metric}" for direction in ("i2t", "t2i") for metric in (
    *(f"R@{k}" for k in RECALL_KS), "mrr", *(f"mrr@{k}" for k in MRR_KS), "median_rank", "mean_rank")))


def eval_metric_names() -> list[str]:
    return list(EVAL_METRICS)


def metric_key(name: str) -> str:
    """'t2i_R@5' or 'eval_t2i_R@5' -> 'eval_t2i_R@5' (the key in the evaluation's metrics)."""
    return "eval_" + name.removeprefix("eval_")


def _check_metric(flag: str, name: str) -> None:
    valid = eval_metric_names()
    if name.removeprefix("eval_") not in valid:
        raise ConfigError(f"{flag} {name!r} is not an eval metric; choose from {', '.join(valid)} "
                          "(with or without the eval_ prefix)")


def _choice(flag: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{flag} {value!r} is unknown; choose from {', '.join(allowed)}")


def _model_has_logit_bias(model: ModelArguments) -> bool | None:
    """Whether the model the run starts from learns a logit bias; None when it cannot be known before loading
    (a Hub id: checked once the model is built)."""
    if model.model_name_or_path is not None:
        saved = _local_model_config(model)
        # a transformers SiglipModel's config.json names no init value, but it always has its bias
        return None if saved is None else (saved.get("logit_bias_init_value") is not None
                                           or saved.get("model_type") in SIGLIP_TYPES)
    if model.model_preset is not None:
        return False  # the presets have no bias
    return model.logit_bias_init is not None


def validate(model: ModelArguments, data: DataArguments, train: TrainingArguments) -> None:
    """Raises ConfigError for the first problem found. Pure: reads the flags (and a local config.json)."""
    if not (train.do_train or train.do_eval):
        raise ConfigError("nothing to do: pass --do_train and/or --do_eval")
    try:  # every numeric flag's range (FLAG_RANGES): the parser checks them too, but not every caller parses
        check_ranges(model, data, train)
    except FlagError as error:
        raise ConfigError(str(error)) from None
    _choice("--dtype", model.dtype, DTYPES)
    try:
        kernels.mode()  # MEDCLIP_KERNELS, read again when the step is traced: a typo fails here, before any work
    except kernels.KernelModeError as error:
        raise ConfigError(str(error)) from None
    _choice("--loss", train.loss, tuple(LOSSES))
    _choice("--lr_schedule", train.lr_schedule, SCHEDULES)
    _choice("--weight_decay_type", train.weight_decay_type, WEIGHT_DECAY_TYPES)
    _choice("--weight_decay_mask", train.weight_decay_mask, WEIGHT_DECAY_MASKS)
    _choice("--hybrid_form", train.hybrid_form, HYBRID_FORMS)
    _choice("--sigmoid_form", train.sigmoid_form, SIGMOID_FORMS)
    if train.sigmoid_form != "gathered" and train.loss != "sigmoid":
        raise ConfigError(f"--sigmoid_form {train.sigmoid_form} computes --loss sigmoid, not --loss {train.loss}: "
                          "drop the flag or use --loss sigmoid")
    if data.csv_delimiter is not None and len(csv_delimiter(data.csv_delimiter)) != 1:
        raise ConfigError(f"--csv_delimiter (--csv-separator) must be one character or 'tab', "
                          f"not {data.csv_delimiter!r}")
    _check_metric("--metric_for_best_model", train.metric_for_best_model)
    if train.loss == "sigmoid" and _model_has_logit_bias(model) is False:
        raise ConfigError("--loss sigmoid needs a learned logit bias: give --logit_bias_init (e.g. -10) with "
                          "--text_model_name_or_path/--vision_model_name_or_path, or a --model_name_or_path "
                          "saved with one (--model_preset models have none)")
    for kind in ("vision", "text"):  # a tower from a config: parsed now, so a typo fails before any loading
        if getattr(model, f"{kind}_config"):
            if getattr(model, f"{kind}_model_name_or_path"):
                raise ConfigError(f"--{kind}_config and --{kind}_model_name_or_path both describe the {kind} "
                                  "tower: give one")
            parse_tower_config(getattr(model, f"{kind}_config"), kind, f"--{kind}_config")
    if train.loss == "concept":
        _choice("--false_negatives", train.false_negatives, FALSE_NEGATIVES)
    if train.hybrid_form == "report" and train.hybrid_temperature != 1.0:
        raise ConfigError("--hybrid_temperature sets --hybrid_form ours's target temperature; the report form uses "
                          "the model's logit temperature for the targets too: drop one of them")
    if train.hybrid_alpha_learnable and train.loss != "hybrid":
        raise ConfigError("--hybrid_alpha_learnable learns the alpha of --loss hybrid: add it, or drop the flag")
    if train.hybrid_alpha_learnable and not 0 < train.hybrid_alpha < 1:
        raise ConfigError(f"--hybrid_alpha_learnable starts at --hybrid_alpha, which must be in (0, 1), not "
                          f"{train.hybrid_alpha}")
    if train.freeze_vision and train.freeze_text:
        raise ConfigError("--freeze_vision and --freeze_text together leave only the projections to train; "
                          "drop one of them")
    if train.reduce_lr_on_plateau:
        _check_plateau(data, train)
    _check_text_objectives(model, data, train)
    _choice("--cache_locked_text", train.cache_locked_text, CACHE_MODES)
    _choice("--cache_locked_image", train.cache_locked_image, CACHE_MODES)
    _choice("--train_crop", data.train_crop, ("random", "center"))
    _choice("--concept_source", data.concept_source, CONCEPT_SOURCES)
    _choice("--vision_head", model.vision_head, ("linear", "none"))
    _choice("--text_pooler", model.text_pooler, ("default", "cls", "mean", "eos", "pooler_output"))
    built_from_towers = model.model_name_or_path is None and model.model_preset is None
    for flag, value, default in (("--vision_head", model.vision_head, "linear"),
                                 ("--text_pooler", model.text_pooler, "default")):
        if value != default and not built_from_towers:
            raise ConfigError(f"{flag} {value} applies to models built from --text_model_name_or_path and "
                              "--vision_model_name_or_path; a saved model or preset keeps its own heads")


def _local_model_config(model: ModelArguments) -> dict | None:
    """config.json of a local --model_name_or_path folder; None when there is none to read before loading."""
    if model.model_name_or_path is None:
        return None
    path = Path(model.model_name_or_path) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _check_text_objectives(model: ModelArguments, data: DataArguments, train: TrainingArguments) -> None:
    """--second_text_field and --mlm (with --mlm_weight/--mlm_probability/--mlm_masking); their ranges are
    FLAG_RANGES'."""
    if not train.mlm and (train.mlm_weight != 1.0 or train.mlm_probability != 0.15 or train.mlm_masking != "token"):
        raise ConfigError("--mlm_weight, --mlm_probability and --mlm_masking configure the MLM objective: add --mlm, "
                          "or drop them")
    _choice("--mlm_masking", train.mlm_masking, MASKINGS)
    saved = _local_model_config(model)
    if saved is None:
        return  # towers, a preset or a Hub id: model_setup checks once the model and tokenizer exist
    extra = saved.get("medclip") or {}
    check_second_text_field(data.second_text_field, extra.get("text_inputs", 1), model.model_name_or_path)
    text_type = (saved.get("text_config") or {}).get("model_type", "clip_text_model" if saved.get("model_type") ==
                                                      "clip" else None)
    if train.mlm and text_type == "clip_text_model" and not model.tokenizer_name:
        raise ConfigError(f"--mlm needs a text tower whose tokenizer has a mask token; {model.model_name_or_path} "
                          "has a CLIP text tower (its BPE vocabulary has no [MASK]): use a BERT-family text tower")


def check_second_text_field(second_text_field: str | None, text_inputs: int, model_name: str) -> None:
    """A saved model's text head reads `text_inputs` pooled outputs: a second text field needs two (checked here
    from a local config.json, and by model_setup once a Hub model is loaded)."""
    if second_text_field and text_inputs != 2:
        raise ConfigError(f"--second_text_field {second_text_field} needs a model with two text inputs, and "
                          f"--model_name_or_path {model_name} was trained with one (its text head takes one "
                          "pooled output): drop the flag, or start from towers")


def _check_plateau(data: DataArguments, train: TrainingArguments) -> None:
    _check_metric("--plateau_metric", train.plateau_metric)
    # One schedule owns the learning rate: a decay that also falls on its own would make the plateau's
    # reductions compound with it in ways nobody reads off a curve. Warmup is allowed.
    if train.lr_schedule != "constant":
        raise ConfigError(f"--reduce_lr_on_plateau needs --lr_schedule constant (after --warmup_steps), "
                          f"not {train.lr_schedule!r}: the plateau is the decay")
    _choice("--plateau_threshold_mode", train.plateau_threshold_mode, ("rel", "abs"))
    has_validation = data.validation_file or data.data_dir or data.dataset_name or data.synthetic_train_samples
    if not has_validation:
        raise ConfigError("--reduce_lr_on_plateau needs validation data (--validation_file, --data_dir, "
                          "--dataset_name or synthetic data): it steps on each epoch's evaluation")
