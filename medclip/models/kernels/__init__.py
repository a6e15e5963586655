"""The kernels the towers compute with: dense, attention, GELU, convolution. One interface, two sets of forms:
`cpu` (custom VJPs and layouts tuned for XLA:CPU) and `plain` (XLA's own operations and
`jax.nn.dot_product_attention`, which XLA fuses on GPU and TPU; on CUDA, attention asks for cuDNN's fused
kernel where it takes the shapes and dtype).

Which form runs follows the platform the computation is lowered for, the devices of its arrays or mesh
(`lax.platform_dependent`: only the chosen branch reaches the compiler), not the process's default backend.
`MEDCLIP_KERNELS` (or `forced(...)`, for tests) overrides it: `auto` (the default), `cpu` (the CPU forms
everywhere), `plain` (the plain forms everywhere, cuDNN attention included only through JAX's own choice).
The choice is read when a function is traced: a function jitted before the setting changed keeps its forms.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator

import jax

from medclip.models.kernels import cpu, plain
from medclip.models.kernels.spec import ConvSpec

__all__ = ["ConvSpec", "ENV", "MODES", "KernelModeError", "attention", "conv2d", "dense", "forced", "gelu", "mode"]

Array = jax.Array
ENV = "MEDCLIP_KERNELS"
MODES = ("auto", "cpu", "plain")
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("medclip_kernels", default=None)


class KernelModeError(ValueError):
    """MEDCLIP_KERNELS (or `forced`) names no mode."""


def _checked(name: str, where: str) -> str:
    if name not in MODES:
        raise KernelModeError(f"{where} must be one of {', '.join(MODES)}, not {name!r}")
    return name


def mode() -> str:
    """The mode in force: `forced(...)`'s, else MEDCLIP_KERNELS, else auto."""
    return _forced.get() or _checked(os.environ.get(ENV, "auto").strip().lower() or "auto", ENV)


@contextlib.contextmanager
def forced(name: str) -> Iterator[None]:
    """Traces with the `name` forms ("cpu", "plain", "auto") inside the block, whatever MEDCLIP_KERNELS says."""
    token = _forced.set(_checked(name, "the kernel mode"))
    try:
        yield
    finally:
        _forced.reset(token)


def _select(cpu_form: Callable, plain_form: Callable, *args, **per_platform: Callable):
    chosen = mode()
    if chosen == "cpu":
        return cpu_form(*args)
    if chosen == "plain":
        return plain_form(*args)
    return jax.lax.platform_dependent(*args, cpu=cpu_form, default=plain_form, **per_platform)


def dense(x: Array, kernel: Array, bias: Array | None = None) -> Array:
    """x @ kernel (+ bias) over the last axis of x."""
    return _select(cpu.dense, plain.dense, x, kernel, bias)


def attention(q: Array, k: Array, v: Array, bias: Array | None) -> Array:
    """softmax(q k^T + bias) v for q, k, v (batch, length, heads, head_dim), the layout of a projection reshaped;
    q comes pre-scaled; `bias` (batch or 1, heads or 1, q, k), additive, fp32. Scores and softmax are fp32
    whatever the compute dtype; the result is (batch, q length, heads, head_dim)."""
    return _select(cpu.attention, plain.attention, q, k, v, bias, cuda=plain.cuda_attention)


def gelu(x: Array) -> Array:
    """Exact (erf) GELU, PyTorch's nn.GELU()."""
    return _select(cpu.gelu, plain.gelu, x)


def conv2d(x: Array, kernel: Array, spec: ConvSpec) -> Array:
    """The convolution of x (NHWC) with kernel (HWIO, x's dtype) under `spec`, in x's dtype."""
    return _select(lambda a, b: cpu.conv2d(a, b, spec), lambda a, b: plain.conv2d(a, b, spec), x, kernel)
