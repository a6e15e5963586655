"""Host memory reuse for XLA:CPU training steps.

XLA:CPU mallocs one scratch buffer per run of a compiled step (1.1 GB for benchmarks/train_step.py's tiny
config). glibc serves a block that large with mmap and returns it with munmap, so every step page-faults the
whole buffer in again: 274k minor faults and 0.77 s of kernel time per tiny step, every step. One malloc arena
(XLA's worker threads would otherwise allocate from per-thread arenas, which mmap anything over 64 MB), no
mmap for large blocks and no trimming make glibc keep and reuse the memory: 0 faults per step after the first;
`benchmarks/train_step.py --configs tiny` went from 0.85x to 0.95x PyTorch's pairs/s (same machine, runs back
to back). The price: the process keeps its peak heap, as a caching allocator does.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import platform

logger = logging.getLogger(__name__)

_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin",
                        "libtpu")
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # <malloc.h>


def _jax_backend_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return False


def keep_host_memory_mapped() -> bool:
    """Makes glibc keep freed host memory for reuse; returns whether it took effect.

    Call it before JAX creates its CPU client (threads pick their malloc arena on first use): the training
    script and the benchmark call it first thing. Process-wide, so library imports never call it. Skipped
    off glibc, when an accelerator is in use (host memory is not the bottleneck there), after JAX has
    started, or with MEDCLIP_KEEP_HOST_MEMORY=0.
    """
    if os.environ.get("MEDCLIP_KEEP_HOST_MEMORY", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms.split(",")[0] not in ("", "cpu") or (
            not platforms and any(importlib.util.find_spec(p) for p in _ACCELERATOR_PLUGINS)):
        return False
    if _jax_backend_started():
        logger.warning("keep_host_memory_mapped() called after JAX started: not applied, so each CPU training "
                       "step page-faults its scratch memory in again")
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        options = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))  # -1: SIZE_MAX, never trim
        return all(libc.mallopt(option, value) == 1 for option, value in options)
    except (OSError, AttributeError):
        return False
