"""The run's configuration, checked once before anything is built: each component's config checks its own
settings (`LossConfig.check`, `OptimizerConfig.check`, `PlateauConfig.check`); what spans components, or needs
the model, is checked here.

Raises `ConfigError` (medclip.training.errors, re-exported here with `DataError` for the callers that import
them from this module)."""

from __future__ import annotations

import json
from pathlib import Path

from medclip.data.concepts import CONCEPT_SOURCES
from medclip.models import kernels
from medclip.training.arguments import DataArguments, ModelArguments, TrainingArguments
from medclip.training.arguments import FlagError, check_ranges, csv_delimiter
from medclip.training.errors import ConfigError, DataError, check_choice  # noqa: F401 (DataError: re-exported)
from medclip.training.eval_metrics import check_metric, eval_metric_names, metric_key  # noqa: F401 (re-exported)
from medclip.training.losses import LossConfig
from medclip.training.mlm import MASKINGS
from medclip.training.optim import OptimizerConfig
from medclip.training.plateau import PlateauConfig
from medclip.training.tower_configs import parse_tower_config

DTYPES = ("auto", "float32", "bfloat16", "float16")
CACHE_MODES = ("auto", "on", "off")  # --cache_locked_text / --cache_locked_image


def _model_has_logit_bias(model: ModelArguments) -> bool | None:
    """Whether the model the run starts from learns a logit bias; None when it cannot be known before loading
    (a Hub id: checked once the model is built)."""
    if model.model_name_or_path is not None:
        saved = _local_model_config(model)
        return None if saved is None else saved.get("logit_bias_init_value") is not None
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
    check_choice("--dtype", model.dtype, DTYPES)
    try:
        kernels.mode()  # MEDCLIP_KERNELS, read again when the step is traced: a typo fails here, before any work
    except kernels.KernelModeError as error:
        raise ConfigError(str(error)) from None
    LossConfig.from_args(train).check()
    OptimizerConfig.from_args(train).check()
    if data.csv_delimiter is not None and len(csv_delimiter(data.csv_delimiter)) != 1:
        raise ConfigError(f"--csv_delimiter (--csv-separator) must be one character or 'tab', "
                          f"not {data.csv_delimiter!r}")
    check_metric("--metric_for_best_model", train.metric_for_best_model)
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
    if train.reduce_lr_on_plateau:
        PlateauConfig.from_args(train).check()
        if not (data.validation_file or data.data_dir or data.dataset_name or data.synthetic_train_samples):
            raise ConfigError("--reduce_lr_on_plateau needs validation data (--validation_file, --data_dir, "
                              "--dataset_name or synthetic data): it steps on each epoch's evaluation")
    _check_text_objectives(model, data, train)
    check_choice("--cache_locked_text", train.cache_locked_text, CACHE_MODES)
    check_choice("--cache_locked_image", train.cache_locked_image, CACHE_MODES)
    check_choice("--train_crop", data.train_crop, ("random", "center"))
    check_choice("--concept_source", data.concept_source, CONCEPT_SOURCES)
    check_choice("--vision_head", model.vision_head, ("linear", "none"))
    check_choice("--text_pooler", model.text_pooler, ("default", "cls", "mean", "eos", "pooler_output"))
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
    check_choice("--mlm_masking", train.mlm_masking, MASKINGS)
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
