"""The tower registry: every vision and text tower by architecture name, with what it needs to be built,
loaded and fed.

`FlaxHybridCLIP` builds its towers from here and never names a concrete one. A tower module owns its frozen
config (a `VisionTowerConfig` / `TextTowerConfig`, with `.tiny()`), its conversion rules for each checkpoint
format it can come from (and the key prefixes under which those formats store it), and, for vision towers, its
default image preprocessing; it registers itself with `register(TowerSpec(...))` at its end. The registry
imports no tower: `medclip.models` (the package, run before any of its modules) imports every built-in one.

The contract every tower follows is medclip.models.tower_contract (re-exported here).
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from medclip.models.config_base import TextTowerConfig, VisionTowerConfig
from medclip.models.tower_contract import (  # noqa: F401 (re-exported: callers know them as registry.*)
    TextTower, TowerSpec, UnknownArchitectureError, UnknownTowerError, UnsupportedOptionError, VisionTower)


_TOWERS: dict[str, TowerSpec] = {}


def register(spec: TowerSpec) -> TowerSpec:
    """Adds a tower; its config class must follow the contract of its kind, `stochastic` included."""
    if spec.kind not in ("vision", "text"):
        raise ValueError(f"tower kind must be vision or text, not {spec.kind!r}")
    contract = VisionTowerConfig if spec.kind == "vision" else TextTowerConfig
    if not issubclass(spec.config_class, contract):
        raise TypeError(f"tower {spec.name!r}: {spec.config_class.__name__} must subclass {contract.__name__}")
    if spec.config_class.stochastic is contract.stochastic:
        raise TypeError(f"tower {spec.name!r}: {spec.config_class.__name__} must define `stochastic` (whether any "
                        "dropout or drop path is active), which feature caches rely on")
    if spec.name in _TOWERS:
        raise ValueError(f"a tower named {spec.name!r} is registered already")
    _TOWERS[spec.name] = spec
    return spec


def towers(kind: str | None = None) -> list[TowerSpec]:
    return [s for s in _TOWERS.values() if kind is None or s.kind == kind]


def tower(name: str) -> TowerSpec:
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
        names = spec.config_class.timm_architectures
        if not names:
            continue
        try:
            return spec.config_class.from_timm_name(architecture, **timm_kwargs)
        except UnsupportedOptionError:
            raise
        except UnknownArchitectureError:
            supported.extend(names)
    raise UnknownArchitectureError(f"timm architecture {architecture!r} is not supported as a vision tower; "
                                   f"supported: {', '.join(supported)}")


def max_text_positions(text_config: TextTowerConfig) -> int:
    """Tokens a text tower takes: RoBERTa numbers positions from pad_token_id + 1."""
    offset = text_config.pad_token_id + 1 if text_config.is_roberta else 0
    return text_config.max_position_embeddings - offset
