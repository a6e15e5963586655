"""The tower registry: every vision and text tower by architecture name, with what it needs to be built,
loaded and fed.

`FlaxHybridCLIP` builds its towers from here and never names a concrete one. A tower module owns its frozen
config (with `.tiny()`), its conversion rules for each checkpoint format it can come from (and the key prefixes
under which those formats store it), and, for vision towers, its default image preprocessing. Adding a tower
is one model file, one `register(TowerSpec(...))` call below, its conversion table and a parity test.

The calling convention every tower follows is written down as `VisionTower` and `TextTower`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
from flax import nnx

from medclip.models.packing import PackingPlan
from medclip.models.preprocess import Preprocess
from medclip.models.weights import Rule


class VisionTower(Protocol):
    config: Any

    def __call__(self, pixel_values: jax.Array, *, dropout_rng: jax.Array | None = None,
                 pooled_only: bool = False, train: bool = False) -> tuple[jax.Array | None, jax.Array]:
        """pixel_values (batch, height, width, channels) NHWC, normalised as the model's `Preprocess` says.

        Returns (hidden_states or None, pooled (batch, hidden_size)). `pooled_only` allows skipping work
        nothing pooled depends on (hidden_states is then None); `dropout_rng` None means no dropout; `train`
        selects batch statistics for towers that have running statistics (BatchNorm), and nothing else."""
        ...


class TextTower(Protocol):
    config: Any

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None, position_ids: jax.Array | None = None, *,
                 dropout_rng: jax.Array | None = None, pooled_only: bool = False,
                 packing: PackingPlan | None = None, pooler: str = "default") -> tuple[jax.Array | None, jax.Array]:
        """input_ids / attention_mask (batch, length), padding marked 0 in the mask.

        Returns (last_hidden_state (batch, length, hidden) or None, pooled (batch, hidden_size)). `packing`
        (a plan from medclip.models.packing.plan_packing on this batch's mask) runs the layers on real tokens
        only; `pooler` picks the pooled output (default, eos, cls, mean, pooler_output: what each tower
        supports, its error says)."""
        ...


@dataclasses.dataclass(frozen=True)
class TowerSpec:
    name: str  # the architecture name, e.g. "clip_vision_model", "timm_vit", "bert"
    kind: str  # vision | text
    config_class: type
    module_class: Callable[..., nnx.Module]  # (config, *, dtype, remat, rngs) -> tower
    # checkpoint format -> rules for that format's keys (with its prefix stripped)
    rules: Callable[[Any, str], list[Rule]]
    # checkpoint format -> key prefixes under which that format stores this tower, most specific first
    prefixes: dict[str, tuple[str, ...]]
    model_types: tuple[str, ...] = ()  # the `model_type` values of config.json this tower reads
    preprocess: Preprocess | None = None  # vision towers: how their source normalised images
    # checkpoint keys (after the prefix) that this tower's source holds and the tower does not use: a timm
    # classifier (`fc.*`), which a trunk drops as timm's `num_classes=0` does
    ignored_keys: str | None = None

    def formats(self) -> tuple[str, ...]:
        return tuple(self.prefixes)


class UnknownTowerError(ValueError):
    """No registered tower of that name, model_type or config class."""


class UnknownArchitectureError(UnknownTowerError):
    """A checkpoint or config names an architecture (a timm model name) no tower can build."""


class UnsupportedOptionError(UnknownArchitectureError):
    """A known architecture with an option (a timm keyword argument, its value) its tower does not build."""


def check_timm_kwargs(name: str, kwargs: dict[str, Any], ours: dict[str, str], no_effect: set[str],
                      defaults: dict[str, tuple]) -> None:
    """Refuses a timm keyword we do not implement, or one set to a value we do not build, by name.

    `ours`: keywords the config reads (timm name -> field); `no_effect`: keywords that change nothing in the
    tower (the classifier, initialisation); `defaults`: keywords accepted only at the values listed."""
    unknown = sorted(set(kwargs) - set(ours) - no_effect - set(defaults))
    if unknown:
        raise UnsupportedOptionError(f"timm kwargs {unknown} for {name} are not supported; supported: "
                                     f"{sorted(set(ours) | no_effect | set(defaults))}")
    bad = {k: kwargs[k] for k in defaults if k in kwargs and kwargs[k] not in defaults[k]}
    if bad:
        raise UnsupportedOptionError(f"timm kwargs {bad} for {name} are not supported (only "
                                     f"{ {k: defaults[k][0] for k in bad} })")


def timm_config_fields(name: str, family: str, architectures: Mapping[str, Any], kwargs: dict[str, Any],
                       ours: dict[str, str], no_effect: set[str], defaults: dict[str, tuple]) -> dict[str, Any]:
    """The config fields of `timm.create_model(name, **kwargs)` for a family of architectures we build:
    an unknown name or keyword is refused by name (check_timm_kwargs), the rest renamed to our fields."""
    if name not in architectures:
        raise UnknownArchitectureError(f"timm architecture {name!r} is not a supported {family}; supported: "
                                       f"{sorted(architectures)}")
    check_timm_kwargs(name, kwargs, ours, no_effect, defaults)
    return {ours[k]: v for k, v in kwargs.items() if k in ours}


_TOWERS: dict[str, TowerSpec] = {}


def register(spec: TowerSpec) -> TowerSpec:
    if spec.kind not in ("vision", "text"):
        raise ValueError(f"tower kind must be vision or text, not {spec.kind!r}")
    if spec.name in _TOWERS:
        raise ValueError(f"a tower named {spec.name!r} is registered already")
    _TOWERS[spec.name] = spec
    return spec


def towers(kind: str | None = None) -> list[TowerSpec]:
    _register_builtin()
    return [s for s in _TOWERS.values() if kind is None or s.kind == kind]


def tower(name: str) -> TowerSpec:
    _register_builtin()
    if name not in _TOWERS:
        raise UnknownTowerError(f"unknown tower {name!r}; registered: {sorted(_TOWERS)}")
    return _TOWERS[name]


def tower_for_model_type(model_type: str | None, kind: str) -> TowerSpec:
    """The tower that reads a config.json of this `model_type`."""
    for spec in towers(kind):
        if model_type in spec.model_types:
            return spec
    supported = sorted(t for s in towers(kind) for t in s.model_types)
    raise UnknownTowerError(f"unknown {kind} model_type {model_type!r}; supported: {supported}")


def tower_for_config(config: Any) -> TowerSpec:
    for spec in towers():
        if type(config) is spec.config_class:
            return spec
    raise UnknownTowerError(f"no tower registered for config class {type(config).__name__}")


def build_tower(config: Any, *, dtype, remat: bool, rngs: nnx.Rngs) -> nnx.Module:
    return tower_for_config(config).module_class(config, dtype=dtype, remat=remat, rngs=rngs)


def config_from_hf_dict(data: dict[str, Any], kind: str) -> Any:
    """A tower config from its config.json dict, picked by `model_type`."""
    return tower_for_model_type(data.get("model_type"), kind).config_class.from_hf_dict(data)


def vision_config_from_timm(architecture: str, **timm_kwargs: Any) -> Any:
    """The vision tower config of `timm.create_model(architecture, **timm_kwargs)`: asked of every vision tower
    whose config class has `from_timm_name` (timm's hub `config.json` names `architecture` + `model_args`, an
    OpenCLIP TimmModel `timm_model_name` + `timm_model_kwargs`). An unknown name is refused listing every
    tower's `timm_architectures`; a known one with options its tower does not build, by that tower's error."""
    supported = []
    for spec in towers("vision"):
        names = getattr(spec.config_class, "timm_architectures", None)
        if names is None:
            continue
        try:
            return spec.config_class.from_timm_name(architecture, **timm_kwargs)
        except UnsupportedOptionError:
            raise
        except UnknownArchitectureError:
            supported.extend(names)
    raise UnknownArchitectureError(f"timm architecture {architecture!r} is not supported as a vision tower; "
                                   f"supported: {', '.join(supported)}")


def max_text_positions(text_config: Any) -> int:
    """Tokens a text tower takes: RoBERTa numbers positions from pad_token_id + 1."""
    offset = text_config.pad_token_id + 1 if getattr(text_config, "is_roberta", False) else 0
    return text_config.max_position_embeddings - offset


_BUILTIN_DONE = False


def _register_builtin() -> None:
    """The towers that ship with medclip (imported lazily: each module is free to import this one)."""
    global _BUILTIN_DONE
    if _BUILTIN_DONE:
        return
    _BUILTIN_DONE = True
    from medclip.models import bert, clip_text, clip_vision, modified_resnet, timm_efficientnet, timm_resnet, timm_vit

    register(TowerSpec("clip_vision_model", "vision", clip_vision.CLIPVisionConfig, clip_vision.VisionTransformer,
                       clip_vision.conversion_rules,
                       prefixes={"hf": ("vision_model.", ""), "openclip": ("visual.",)},
                       model_types=("clip_vision_model", "clip"), preprocess=clip_vision.CLIPVisionConfig.default_preprocess))
    register(TowerSpec("timm_vit", "vision", timm_vit.TimmViTConfig, clip_vision.VisionTransformer,
                       timm_vit.conversion_rules, prefixes={"timm": ("visual.trunk.", "trunk.", "")},
                       model_types=("timm_vit",), preprocess=timm_vit.INCEPTION_PREPROCESS))
    register(TowerSpec("modified_resnet", "vision", modified_resnet.ModifiedResNetConfig,
                       modified_resnet.ModifiedResNet, modified_resnet.conversion_rules,
                       prefixes={"openclip": ("visual.", "")}, model_types=("modified_resnet",),
                       preprocess=modified_resnet.ModifiedResNetConfig.default_preprocess))
    timm_classifier = r"^(fc|classifier)\."
    register(TowerSpec("timm_resnet", "vision", timm_resnet.TimmResNetConfig, timm_resnet.TimmResNet,
                       timm_resnet.conversion_rules, prefixes={"timm": ("visual.trunk.", "trunk.", "")},
                       model_types=("timm_resnet",), preprocess=timm_resnet.TimmResNetConfig.default_preprocess,
                       ignored_keys=timm_classifier))
    register(TowerSpec("timm_efficientnet", "vision", timm_efficientnet.TimmEfficientNetConfig,
                       timm_efficientnet.TimmEfficientNet, timm_efficientnet.conversion_rules,
                       prefixes={"timm": ("visual.trunk.", "trunk.", "")}, model_types=("timm_efficientnet",),
                       preprocess=timm_efficientnet.TimmEfficientNetConfig.default_preprocess,
                       ignored_keys=timm_classifier))
    register(TowerSpec("clip_text_model", "text", clip_text.CLIPTextConfig, clip_text.CLIPTextTower,
                       clip_text.conversion_rules, prefixes={"hf": ("text_model.", ""), "openclip": ("",)},
                       model_types=("clip_text_model",)))
    register(TowerSpec("bert", "text", bert.BertConfig, bert.BertTower, bert.conversion_rules,
                       prefixes={"hf": ("", "bert.", "roberta.", "distilbert.", "text_model.", "model."),
                                 "openclip": ("text.transformer.",)},
                       model_types=bert.BERT_MODEL_TYPES))
