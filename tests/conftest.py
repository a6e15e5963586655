"""Suite-wide set-up that keeps `make test` inside CI's time on a 2-core machine.

- One persistent XLA compilation cache per pytest run (a fresh temporary folder, so nothing carries over between
  runs): the many `run_hybrid_clip.py` children of the resume and recipe tests compile the same programs, and
  every child after the first loads them instead of compiling again. Set in the environment before JAX is
  imported, so this process and every child use it. A cache hit is the same executable, so numbers do not
  change; `MEDCLIP_TEST_COMPILATION_CACHE=0` turns it off.
- Tests marked `heavy` (minutes each: several trainer processes) are collected first, so that pytest-xdist's
  workers start them early instead of one of them running the last heavy test alone at the end.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

_CACHE_DIR: str | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _CACHE_DIR
    config.addinivalue_line("markers", "heavy: runs trainer processes for minutes; scheduled first")
    if os.environ.get("MEDCLIP_TEST_COMPILATION_CACHE", "1") == "0":
        # Off for the trainer children too, which would otherwise use their default, ~/.cache/medclip/xla.
        os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
        return
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:  # the controller (or a run without xdist) owns the folder; xdist workers inherit it
        _CACHE_DIR = tempfile.mkdtemp(prefix="medclip-test-xla-cache-")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
        # Tiny test programs compile in well under JAX's default 1 s threshold for caching.
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


def pytest_unconfigure(config: pytest.Config) -> None:
    if _CACHE_DIR is not None:
        shutil.rmtree(_CACHE_DIR, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)  # stable: order within each group kept
