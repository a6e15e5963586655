"""The typed errors of a training run, at the bottom of `medclip.training` so every module can raise them.

Library code raises `ConfigError` (a flag, or a combination of flags, is wrong: the message names the flag) or
`DataError` (the data cannot make the run the flags ask for); `run_hybrid_clip.py` turns them into exit
codes 2 and 3 with the message on stderr. `check_choice` words every "not one of these names" error alike."""

from __future__ import annotations

from collections.abc import Iterable


class ConfigError(ValueError):
    """A flag or a combination of flags that cannot work; the message names the flag and what to do."""


class DataError(ValueError):
    """The data cannot serve the run (too few pairs, not the checkpoint's data...)."""


def check_choice(flag: str, value: str, allowed: Iterable[str]) -> None:
    """ConfigError naming the flag, the value and the choices, when `value` is not one of `allowed`."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"{flag} {value!r} is unknown; choose from {', '.join(allowed)}")
