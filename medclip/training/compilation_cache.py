"""JAX's persistent compilation cache for the trainer: the next run with the same model, batch and devices
loads its compiled steps instead of compiling them again (k-fold runs, restarts, resumes, sweeps)."""

from __future__ import annotations

import os
from pathlib import Path

OFF = ("off", "none", "0", "")


def default_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medclip" / "xla"


def enable(setting: str | None) -> Path | None:
    """Points JAX at the cache folder; returns it, or None when turned off. `setting`: a folder, "off", or None
    for $JAX_COMPILATION_CACHE_DIR if set, else ~/.cache/medclip/xla (JAX's own JAX_ENABLE_COMPILATION_CACHE=false
    turns the default off). Call before the first compilation."""
    import jax

    if setting is None:
        if not jax.config.jax_enable_compilation_cache:
            return None
        setting = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(default_dir())
    if setting.strip().lower() in OFF:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    folder = Path(setting).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_enable_compilation_cache", True)
    return folder
