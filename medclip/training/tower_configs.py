"""`--vision_config` / `--text_config`: a tower trained from scratch is described by a config, not a checkpoint.

    clip_vision_model:hidden_size=256,num_hidden_layers=4,image_size=128,patch_size=16   # the base defaults
    bert.tiny:vocab_size=30522                                                           # the tower's .tiny()
    my_tower.json        # {"tower": "clip_vision_model", "hidden_size": 256, ...}, or "model_type" for "tower"

The name is a registered tower of that kind (`medclip.models.registry.towers(kind)`); every key must be a field
of its config class. Values are read as the field's type (int, float, bool: true/false, str); a JSON file's
values are taken as they are. The model built from it is initialised from --seed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medclip.models import registry
from medclip.training.errors import ConfigError

if TYPE_CHECKING:
    from medclip.training.arguments import ModelArguments


def _fields(config_class: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(config_class)}


def _parse_value(flag: str, key: str, text: str, current: Any) -> Any:
    try:
        if isinstance(current, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, str):
            return text
        return json.loads(text)
    except ValueError:
        raise ConfigError(f"{flag}: {key}={text!r} is not a valid {type(current).__name__}") from None


def _spec(flag: str, name: str, kind: str) -> registry.TowerSpec:
    names = [s.name for s in registry.towers(kind)]
    if name not in names:
        raise ConfigError(f"{flag}: unknown {kind} tower {name!r}; registered {kind} towers: {', '.join(names)}")
    return registry.tower(name)


def _build(flag: str, spec: registry.TowerSpec, base: Any, changes: dict[str, Any]) -> Any:
    fields = _fields(spec.config_class)
    unknown = sorted(set(changes) - set(fields))
    if unknown:
        raise ConfigError(f"{flag}: {spec.name} has no field {', '.join(map(repr, unknown))}; its fields: "
                          f"{', '.join(fields)}")
    try:
        return base.replace(**changes)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{flag}: {e}") from None


def _from_json(flag: str, path: Path, kind: str) -> Any:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{flag} {path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{flag} {path}: expected a JSON object")
    data = dict(data)
    name = data.pop("tower", None)
    if name is None:
        model_type = data.get("model_type")
        try:
            name = registry.tower_for_model_type(model_type, kind).name
        except registry.UnknownTowerError as e:
            raise ConfigError(f"{flag} {path}: name the tower with \"tower\" (or \"model_type\"): {e}") from None
    spec = _spec(flag, name, kind)
    if "model_type" not in _fields(spec.config_class):
        data.pop("model_type", None)  # a class-level constant of this config (clip_vision_model)
    return _build(f"{flag} {path}", spec, spec.config_class(), data)


def parse_tower_config(value: str, kind: str, flag: str) -> Any:
    """A tower config of `kind` ("vision" | "text") from the flag's value; ConfigError names what is wrong."""
    if value.endswith(".json") or Path(value).is_file():
        return _from_json(flag, Path(value), kind)
    name, _, overrides = value.partition(":")
    name, _, preset = name.strip().partition(".")
    spec = _spec(flag, name, kind)
    if preset not in ("", "tiny"):
        raise ConfigError(f"{flag}: unknown preset {preset!r} of {name}; use {name}:... (base defaults) or "
                          f"{name}.tiny:... (its .tiny())")
    base = spec.config_class.tiny() if preset else spec.config_class()
    fields = _fields(spec.config_class)
    changes = {}
    for item in filter(None, (part.strip() for part in overrides.split(","))):
        key, equals, text = item.partition("=")
        key = key.strip()
        if not equals:
            raise ConfigError(f"{flag}: expected key=value, got {item!r}")
        if key not in fields:
            raise ConfigError(f"{flag}: {name} has no field {key!r}; its fields: {', '.join(fields)}")
        changes[key] = _parse_value(flag, key, text.strip(), getattr(base, key))
    return _build(flag, spec, base, changes)


def tower_config_flag(model_args: ModelArguments, kind: str) -> Any | None:
    """--{kind}_config parsed (None when not given): `validate` calls it so a typo fails before any loading,
    model_setup to build the tower. Refused beside --{kind}_model_name_or_path, which describes the same tower."""
    value = getattr(model_args, f"{kind}_config")
    if not value:
        return None
    if getattr(model_args, f"{kind}_model_name_or_path"):
        raise ConfigError(f"--{kind}_config and --{kind}_model_name_or_path both describe the {kind} tower: give one")
    return parse_tower_config(value, kind, f"--{kind}_config")
