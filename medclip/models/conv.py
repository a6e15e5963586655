"""Convolutional building blocks in NHWC with PyTorch's semantics: convolutions (symmetric or TensorFlow "same"
padding; computed by `medclip.models.kernels`), BatchNorm with running statistics, pooling.

BatchNorm's running statistics are `nnx.BatchStat` variables next to the parameters: the trainer carries them in
its state (replicated on the mesh, in orbax checkpoints), the converters load and save them under PyTorch's
`running_mean` / `running_var`, and training updates them from the global batch exactly as torch does (running
variance from the unbiased batch variance, momentum 0.1), so a step here and in PyTorch leave the same statistics.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from medclip.models import kernels
from medclip.models.kernels import ConvSpec

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
        if self.padding == "same":
            pad = (same_padding(x.shape[1], kh, self.stride[0], self.dilation[0]),
                   same_padding(x.shape[2], kw, self.stride[1], self.dilation[1]))
        else:
            p = _pair(self.padding)
            pad = ((p[0], p[0]), (p[1], p[1]))
        spec = ConvSpec(self.stride, pad, self.dilation, self.groups)
        y = kernels.conv2d(x.astype(self.dtype), self.kernel[...].astype(self.dtype), spec)
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


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
