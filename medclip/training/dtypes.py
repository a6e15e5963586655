"""--dtype: the compute dtypes a run may ask for, in one table that the flag check and the trainer both read
(parameters stay float32 whatever it is)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from medclip.training.errors import check_choice

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
DTYPE_NAMES = ("auto", *DTYPES)  # the values of --dtype


def check_dtype(name: str) -> None:
    check_choice("--dtype", name, DTYPE_NAMES)


def compute_dtype(name: str, platform: str) -> Any:
    """--dtype on devices of `platform`. `auto`: bfloat16 on TPU and GPU, whose matrix units run it several times
    faster than fp32, float32 on CPU, where the kernels are tuned and measured in fp32."""
    check_dtype(name)
    if name == "auto":
        name = "float32" if platform == "cpu" else "bfloat16"
    return DTYPES[name]
