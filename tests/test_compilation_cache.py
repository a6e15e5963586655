"""--compilation_cache_dir: where JAX's persistent cache goes, and off."""

from __future__ import annotations

import jax

from medclip.training import compilation_cache


def test_a_folder_an_environment_default_and_off(tmp_path, monkeypatch):
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache)
    try:
        assert compilation_cache.enable(str(tmp_path / "a")) == tmp_path / "a" and (tmp_path / "a").is_dir()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "a")
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
        assert compilation_cache.enable(None) == tmp_path / "env"
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert compilation_cache.enable(None) == tmp_path / "xdg" / "medclip" / "xla"
        assert compilation_cache.enable("off") is None and not jax.config.jax_enable_compilation_cache
        assert compilation_cache.enable(None) is None  # JAX_ENABLE_COMPILATION_CACHE=false: no default folder
        assert compilation_cache.enable(str(tmp_path / "b")) == tmp_path / "b"  # an explicit folder still wins
        assert jax.config.jax_enable_compilation_cache
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_enable_compilation_cache", before[1])
