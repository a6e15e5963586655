"""The run's configuration, checked once before anything is built: each component's config checks its own
settings (`LossConfig.check`, `OptimizerConfig.check`, `PlateauConfig.check`); what spans components, or needs
the model, is checked here.

Raises `ConfigError` (medclip.training.errors, re-exported here with `DataError` for the callers that import
them from this module)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from medclip.checkpoints.hf_config import CONFIG_JSON, read_config_json
from medclip.data.concepts import CONCEPT_SOURCES
from medclip.models import HybridCLIPConfig, kernels
from medclip.training.arguments import DataArguments, ModelArguments, TrainingArguments
from medclip.training.arguments import FlagError, check_ranges, csv_delimiter
from medclip.training.dtypes import check_dtype
from medclip.training.errors import ConfigError, DataError, check_choice  # noqa: F401 (DataError: re-exported)
from medclip.training.eval_metrics import check_metric, eval_metric_names, metric_key  # noqa: F401 (re-exported)
from medclip.training.losses import LossConfig
from medclip.training.mlm import MASKINGS
from medclip.training.optim import OptimizerConfig
from medclip.training.plateau import PlateauConfig
from medclip.training.tower_configs import tower_config_flag

CACHE_MODES = ("auto", "on", "off")  # --cache_locked_text / --cache_locked_image


def validate(model: ModelArguments, data: DataArguments, train: TrainingArguments) -> None:
    """Raises ConfigError for the first problem found. Pure: reads the flags (and a local model's config.json)."""
    if not (train.do_train or train.do_eval):
        raise ConfigError("nothing to do: pass --do_train and/or --do_eval")
    try:  # every numeric flag's range (FLAG_RANGES): the parser checks them too, but not every caller parses
        check_ranges(model, data, train)
    except FlagError as error:
        raise ConfigError(str(error)) from None
    check_dtype(model.dtype)
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
    for kind in ("vision", "text"):
        tower_config_flag(model, kind)
    if train.reduce_lr_on_plateau:
        PlateauConfig.from_args(train).check()
        if not (data.validation_file or data.data_dir or data.dataset_name or data.synthetic_train_samples):
            raise ConfigError("--reduce_lr_on_plateau needs validation data (--validation_file, --data_dir, "
                              "--dataset_name or synthetic data): it steps on each epoch's evaluation")
    if not train.mlm and (train.mlm_weight != 1.0 or train.mlm_probability != 0.15 or train.mlm_masking != "token"):
        raise ConfigError("--mlm_weight, --mlm_probability and --mlm_masking configure the MLM objective: add --mlm, "
                          "or drop them")
    check_choice("--mlm_masking", train.mlm_masking, MASKINGS)
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
    starting = starting_model(model, data)
    if starting is not None:  # else a Hub id: the trainer checks once the model is loaded
        check_model(model, data, train, starting)


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What the flags are checked against in the model a run starts from (`check_model`): known before loading
    for a preset, towers or a local saved model (its config.json), after loading for a Hub id."""

    name: str  # the model, as messages name it
    has_logit_bias: bool
    text_inputs: int  # pooled text outputs the text head reads: 2 with a second text field
    clip_text: bool  # a CLIP text tower, whose BPE vocabulary has no [MASK]

    @classmethod
    def of(cls, config: HybridCLIPConfig, name: str) -> ModelFacts:
        return cls(name=name, has_logit_bias=config.logit_bias_init_value is not None,
                   text_inputs=config.text_inputs, clip_text=config.text_config.model_type == "clip_text_model")


def model_name(model: ModelArguments) -> str:
    if model.model_name_or_path is not None:
        return model.model_name_or_path
    if model.model_preset is not None:
        return f"--model_preset {model.model_preset}"
    return "the model built from towers"


def starting_model(model: ModelArguments, data: DataArguments) -> ModelFacts | None:
    """The model the flags start from, as far as it is known before loading; None for a saved model whose
    config is not on this machine (a Hub id, a bucket) or that is not a dual encoder we read (the loader says
    why)."""
    if model.model_name_or_path is None:  # built by the run: as the flags say (model_setup builds it so)
        return ModelFacts(name=model_name(model), text_inputs=2 if data.second_text_field else 1, clip_text=False,
                          has_logit_bias=model.model_preset is None and model.logit_bias_init is not None)
    folder = Path(model.model_name_or_path)
    if not (folder / CONFIG_JSON).is_file():
        return None
    try:
        return ModelFacts.of(HybridCLIPConfig.from_dict(read_config_json(folder)), model_name(model))
    except (ValueError, KeyError, TypeError, AttributeError):  # the loader will name the problem
        return None


def check_model(model: ModelArguments, data: DataArguments, train: TrainingArguments, facts: ModelFacts) -> None:
    """The flags that need the model to be of a kind: run by `validate` on what is known before loading, and by
    the trainer on the loaded model."""
    if train.loss == "sigmoid" and not facts.has_logit_bias:
        raise ConfigError(f"--loss sigmoid needs a learned logit bias, and {facts.name} has none: give "
                          "--logit_bias_init (e.g. -10) with --text_model_name_or_path/--vision_model_name_or_path, "
                          "start from a --model_name_or_path saved with one (logit_bias_init_value), or use "
                          "--loss clip")
    if data.second_text_field and facts.text_inputs != 2:
        raise ConfigError(f"--second_text_field {data.second_text_field} needs a model with two text inputs, and "
                          f"--model_name_or_path {facts.name} was trained with one (its text head takes one "
                          "pooled output): drop the flag, or start from towers")
    if train.mlm and facts.clip_text and not model.tokenizer_name:
        raise ConfigError(f"--mlm needs a text tower whose tokenizer has a mask token; {facts.name} has a CLIP "
                          "text tower (its BPE vocabulary has no [MASK]): use a BERT-family text tower")
