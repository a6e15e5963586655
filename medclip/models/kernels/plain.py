"""The kernels' plain forms: XLA's own dense, convolution, GELU and `jax.nn.dot_product_attention`, which XLA
fuses freely on GPU and TPU. Same values as `medclip.models.kernels.cpu` (a test compares the losses and
gradients of whole towers)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from medclip.models.kernels.spec import ConvSpec

Array = jax.Array


def gelu(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=False)


def dense(x: Array, kernel: Array, bias: Array | None = None) -> Array:
    y = x @ kernel
    return y if bias is None else y + bias


def attention(q: Array, k: Array, v: Array, bias: Array | None) -> Array:
    """JAX's attention, whichever implementation it picks (jax 0.10.2: XLA's, fp32 scores and softmax,
    probabilities in v's dtype, what the CPU form computes)."""
    return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=1.0)


_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def cuda_attention(q: Array, k: Array, v: Array, bias: Array | None) -> Array:
    """cuDNN's fused attention where it takes the shapes and dtype (bf16/fp16, head_dim a multiple of 8 up to
    256, even lengths with a bias; it checks them while tracing and raises), XLA's otherwise. jax 0.10.2's
    `implementation=None` always picks XLA, so cuDNN is asked for by name. The bias is cast to q's dtype,
    clamped to its finite range (a padding bias holds float32's most negative value)."""
    if q.dtype in _CUDNN_DTYPES:
        cudnn_bias = None
        if bias is not None:
            cudnn_bias = jnp.maximum(bias, jnp.finfo(q.dtype).min).astype(q.dtype)
            cudnn_bias = jnp.broadcast_to(cudnn_bias, (*bias.shape[:2], q.shape[1], k.shape[1]))
        try:
            return jax.nn.dot_product_attention(q, k, v, bias=cudnn_bias, scale=1.0, implementation="cudnn")
        except (NotImplementedError, ValueError, RuntimeError):  # shapes, dtype, or no cuDNN where traced
            pass
    return attention(q, k, v, bias)


def conv2d(x: Array, kernel: Array, spec: ConvSpec) -> Array:
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=spec.stride, padding=spec.padding, rhs_dilation=spec.dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=spec.groups)
