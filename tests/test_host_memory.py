"""Host memory reuse for XLA:CPU: applied only in a fresh process, on request, before JAX starts.

Its effect (no page faults per step) is measured by benchmarks/train_step.py, which records whether it took
effect; a fault count of a toy program depends on how glibc's heap happens to grow, so it is not asserted here.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from medclip.training.host_memory import keep_host_memory_mapped

_PROBE = """
from medclip.training.host_memory import keep_host_memory_mapped
applied = keep_host_memory_mapped()
import jax.numpy as jnp
jnp.ones(4).block_until_ready()
print(applied, keep_host_memory_mapped())
"""


def _probe(env_value: str) -> list[str]:
    env = {**os.environ, "MEDCLIP_KEEP_HOST_MEMORY": env_value, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()[-2:]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc tuning")
def test_applied_before_jax_starts_and_refused_after():
    assert _probe("1") == ["True", "False"]


def test_switched_off_by_environment():
    assert _probe("0") == ["False", "False"]


def test_not_applied_once_jax_has_started():
    import jax.numpy as jnp

    jnp.zeros(1).block_until_ready()
    assert keep_host_memory_mapped() is False
