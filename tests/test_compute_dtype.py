"""--dtype auto: bf16 compute on TPU and GPU, fp32 on CPU; the default, so the recipes train that way."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from medclip.training.arguments import ModelArguments
from medclip.training.config_check import ConfigError
from medclip.training.model_setup import compute_dtype


@pytest.mark.parametrize("platform, expected", [("tpu", jnp.bfloat16), ("gpu", jnp.bfloat16), ("cpu", jnp.float32)])
def test_auto_is_bf16_on_accelerators_and_fp32_on_cpu(platform, expected):
    assert compute_dtype("auto", platform) == expected
    assert compute_dtype("float32", platform) == jnp.float32  # an explicit dtype is kept everywhere
    assert compute_dtype("bfloat16", platform) == jnp.bfloat16


def test_auto_is_the_default_and_a_bad_name_is_one_line():
    assert ModelArguments().dtype == "auto"
    with pytest.raises(ConfigError, match="^--dtype 'float64' is unknown; choose from auto, float32, bfloat16, float16$"):
        compute_dtype("float64", "cpu")

