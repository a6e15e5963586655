"""timm keyword arguments checked against what a tower builds: shared by the timm-derived towers, so that an
option we do not implement is refused by name rather than silently ignored."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from medclip.models.tower_contract import UnknownArchitectureError, UnsupportedOptionError

# checkpoint keys of a timm classifier (`fc.*`, `classifier.*`), which a trunk drops as timm's `num_classes=0` does
TIMM_CLASSIFIER = r"^(fc|classifier)\."


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
    an unknown name or keyword is refused by name (check_timm_kwargs), the rest renamed to our fields. A None
    keyword is dropped first, as timm.create_model drops it (the architecture's default stands)."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if name not in architectures:
        raise UnknownArchitectureError(f"timm architecture {name!r} is not a supported {family}; supported: "
                                       f"{sorted(architectures)}")
    check_timm_kwargs(name, kwargs, ours, no_effect, defaults)
    return {ours[k]: v for k, v in kwargs.items() if k in ours}
