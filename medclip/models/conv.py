"""Convolutional building blocks in NHWC with PyTorch's semantics: convolutions (symmetric or TensorFlow "same"
padding), BatchNorm with running statistics, pooling.

BatchNorm's running statistics are `nnx.BatchStat` variables next to the parameters: the trainer carries them in
its state (replicated on the mesh, in orbax checkpoints), the converters load and save them under PyTorch's
`running_mean` / `running_var`, and training updates them from the global batch exactly as torch does (running
variance from the unbiased batch variance, momentum 0.1), so a step here and in PyTorch leave the same statistics.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow's "SAME" padding of one axis (timm's Conv2dSame): the extra pixel goes after."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class Conv2d(nnx.Module):
    """torch.nn.Conv2d on NHWC input, kernel stored HWIO (`kernel`, and `bias` when it has one).

    `padding` is an int (symmetric, as torch) or "same" (TensorFlow's, computed from the input size)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], *, stride: int = 1,
                 padding: int | str = 0, dilation: int = 1, groups: int = 1, bias: bool = False, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kh, kw = _pair(kernel_size)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels {in_channels} -> {out_channels} do not divide into {groups} groups")
        init = jax.nn.initializers.variance_scaling(2.0, "fan_in", "normal")  # He: ReLU/SiLU towers
        self.kernel = nnx.Param(init(rngs.params(), (kh, kw, in_channels // groups, out_channels)))
        self.bias = nnx.Param(jnp.zeros((out_channels,))) if bias else None
        self.stride, self.padding, self.dilation, self.groups = _pair(stride), padding, _pair(dilation), groups
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        kh, kw = self.kernel.shape[:2]
        if (kh, kw) == (1, 1) and self.groups == 1 and self.padding in (0, "same"):
            y = pointwise(x, self.kernel[...], self.stride, self.dtype)
            return y if self.bias is None else y + self.bias[...].astype(self.dtype)
        if self.padding == "same":
            pad = [same_padding(x.shape[1], kh, self.stride[0], self.dilation[0]),
                   same_padding(x.shape[2], kw, self.stride[1], self.dilation[1])]
        else:
            p = _pair(self.padding)
            pad = [(p[0], p[0]), (p[1], p[1])]
        spec = ConvSpec(self.stride, tuple(pad), self.dilation, self.groups)
        y = conv2d(x.astype(self.dtype), self.kernel[...].astype(self.dtype), spec).astype(self.dtype)
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class ConvSpec(NamedTuple):
    stride: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]
    dilation: tuple[int, int]
    groups: int


def _conv(x: Array, kernel: Array, spec: ConvSpec) -> Array:
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=spec.stride, padding=spec.padding, rhs_dilation=spec.dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=spec.groups,
        preferred_element_type=jnp.float32)


# Elements of input plus output gradient per slice of the batch in the kernel gradient on CPU: about what stays in
# cache (benchmarks/conv_paths.py measured 2^19..2^20 best across RN50's shapes), and at most this many slices,
# so that a large per-device batch does not unroll into hundreds of convolutions.
_CPU_SLICE_ELEMENTS = 2 ** 20
_CPU_MAX_SLICES = 16


def _kernel_grad_in_slices(x: Array, kernel: Array, dy: Array, spec: ConvSpec) -> Array:
    """The kernel gradient summed over slices of the batch. XLA:CPU computes it as one convolution whose kernel is
    the whole output gradient; over the whole batch at 56x56 or 112x112 that runs several times slower than over
    a few examples at a time. The slices take every k-th example (a reshape, then an index on the new unsharded
    axis), so a batch sharded over a mesh is sliced on each device without moving data."""
    n = x.shape[0]
    per_example = math.prod(x.shape[1:]) + math.prod(dy.shape[1:])
    size = max(1, min(n, _CPU_SLICE_ELEMENTS // per_example), -(-n // _CPU_MAX_SLICES))
    while n % size:
        size -= 1
    slices = n // size
    if slices == 1:
        return jax.vjp(lambda k: _conv(x, k, spec), kernel)[1](dy)[0]
    xs, dys = x.reshape(size, slices, *x.shape[1:]), dy.reshape(size, slices, *dy.shape[1:])
    grad = None
    for i in range(slices):
        g = jax.vjp(lambda k: _conv(xs[:, i], k, spec), kernel)[1](dys[:, i])[0].astype(jnp.float32)
        grad = g if grad is None else grad + g
    return grad.astype(kernel.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d(x: Array, kernel: Array, spec: ConvSpec) -> Array:
    """`lax.conv_general_dilated` (NHWC, HWIO, fp32 accumulation) whose kernel gradient on CPU is computed over
    slices of the batch (`_kernel_grad_in_slices`); elsewhere, and for the input gradient, XLA's own."""
    return _conv(x, kernel, spec)


def _conv2d_fwd(x, kernel, spec):
    return _conv(x, kernel, spec), (x, kernel)


def _conv2d_bwd(spec, residuals, dy):
    x, kernel = residuals
    dy = dy.astype(jnp.float32)
    dx = jax.vjp(lambda v: _conv(v, kernel, spec), x)[1](dy)[0]
    dk = jax.lax.platform_dependent(
        x, kernel, dy, cpu=functools.partial(_kernel_grad_in_slices, spec=spec),
        default=lambda x, k, d: jax.vjp(lambda v: _conv(x, v, spec), k)[1](d)[0])
    return dx, dk


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def pointwise(x: Array, kernel: Array, stride: tuple[int, int], dtype) -> Array:
    """A 1x1 convolution as one (pixels, in) @ (in, out) matmul (a strided one reads every stride-th pixel, which
    is what the convolution computes, and "same" padding adds nothing to a 1x1 kernel). XLA:CPU runs this form's
    backward pass several times faster than the convolution's (`benchmarks/conv_paths.py`)."""
    if stride != (1, 1):
        x = x[:, ::stride[0], ::stride[1]]
    n, h, w, c = x.shape
    y = jnp.matmul(x.astype(dtype).reshape(n * h * w, c), kernel[0, 0].astype(dtype),
                   preferred_element_type=jnp.float32)
    return y.reshape(n, h, w, -1).astype(dtype)


class BatchNorm(nnx.Module):
    """torch.nn.BatchNorm2d over the channel (last) axis: `scale`, `bias` parameters, `mean`, `var` BatchStats.

    `train=True` normalises with the batch's statistics (over batch and space, fp32) and updates the running
    ones; `train=False` uses the running ones. Under `jax.jit` over a mesh the batch axis is the global batch,
    so the statistics are the global batch's on any number of devices."""

    def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float = 0.1, dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        del rngs
        self.scale = nnx.Param(jnp.ones((num_features,)))
        self.bias = nnx.Param(jnp.zeros((num_features,)))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,)))
        self.var = nnx.BatchStat(jnp.ones((num_features,)))
        self.eps, self.momentum, self.dtype = eps, momentum, dtype

    def __call__(self, x: Array, train: bool = False) -> Array:
        if train:
            axes = tuple(range(x.ndim - 1))
            x32 = x.astype(jnp.float32)
            mean = x32.mean(axes)
            var = jnp.square(x32 - mean).mean(axes)  # biased: what normalises, as in torch
            n = math.prod(x.shape[:-1])
            m = self.momentum
            self.mean[...] = (1 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean)
            self.var[...] = (1 - m) * self.var[...] + m * jax.lax.stop_gradient(var) * (n / max(n - 1, 1))
        else:
            mean, var = self.mean[...], self.var[...]
        inv = jax.lax.rsqrt(var + self.eps) * self.scale[...]
        return (x.astype(jnp.float32) * inv + (self.bias[...] - mean * inv)).astype(self.dtype)


def max_pool(x: Array, kernel: int, stride: int, padding: int = 0) -> Array:
    """torch.nn.MaxPool2d (padding with -inf)."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, kernel, kernel, 1), (1, stride, stride, 1),
                                 [(0, 0), (padding, padding), (padding, padding), (0, 0)])


def avg_pool(x: Array, kernel: int, stride: int | None = None) -> Array:
    """torch.nn.AvgPool2d without padding (what ModifiedResNet's anti-aliased downsampling uses)."""
    stride = stride or kernel
    if stride == kernel:  # non-overlapping windows: a reshape and a mean, whose gradient is a broadcast
        n, h, w, c = x.shape
        ho, wo = h // kernel, w // kernel  # torch floors: trailing rows / columns that fill no window are dropped
        x = x[:, :ho * kernel, :wo * kernel]
        return x.reshape(n, ho, kernel, wo, kernel, c).mean(axis=(2, 4))
    summed = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, kernel, kernel, 1), (1, stride, stride, 1), "VALID")
    return summed / (kernel * kernel)


def global_avg_pool(x: Array) -> Array:
    """(batch, height, width, channels) -> (batch, channels)."""
    return x.mean(axis=(1, 2))
