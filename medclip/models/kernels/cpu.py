"""The kernels' forms for XLA:CPU: the same values as XLA's plain operations, arranged so that XLA:CPU runs them
fast (hand-written backward passes, transposes that keep dots on YNNPACK, a 1x1 convolution as a matmul, the
kernel gradient of a convolution over slices of the batch).

Only `medclip.models.kernels` calls these, and only where the computation runs on a CPU: on GPU and TPU the
custom VJPs and optimization barriers would block XLA's fusions and cuDNN's fused attention. Every form runs
inside the named scope `SCOPE`, which marks it in lowered modules (a test asserts that a step exported for TPU
or CUDA holds none). Speed-ups quoted here were measured with `benchmarks/train_step.py` and
`benchmarks/conv_paths.py` on XLA:CPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from medclip.models.kernels.spec import ConvSpec

Array = jax.Array

SCOPE = "medclip_cpu_kernel"


def _scoped(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with jax.named_scope(SCOPE):
            return fn(*args, **kwargs)
    return wrapper


@_scoped
def gelu(x: Array) -> Array:
    """Exact GELU in PyTorch's form, 0.5 x (1 + erf(x / sqrt 2)).

    `jax.nn.gelu(approximate=False)` computes the same function through erfc, whose XLA:CPU expansion is
    2.6x slower (forward of a 4096x1024 block: 6.5 ms against 2.5 ms; a tiny-config training step 3.5% faster).
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * 0.7071067811865476))


def _weight_grad(x: Array, dy: Array) -> Array:
    """x^T dy for x (tokens, in) and dy (tokens, out): a dense layer's kernel gradient.

    XLA:CPU hands a dot to YNNPACK only if its lhs contracts the minor dimension; x^T dy contracts the token
    dimension of both operands, so XLA runs it on its Eigen fallback at half speed (one core, 4096 tokens,
    256 -> 1024: 45 against 83 GFLOP/s; 2048 tokens, 768 -> 3072: 46 against 91). Transposing the narrower
    operand first keeps the dot on YNNPACK; `optimization_barrier` stops XLA folding the transpose back into
    the dot (and, on the dy side, the transpose of the result).
    """
    barrier = jax.lax.optimization_barrier
    if x.shape[1] <= dy.shape[1]:
        return barrier(x.T) @ dy
    return barrier(barrier(dy.T) @ x).T


@jax.custom_vjp
def _dense(x: Array, kernel: Array, bias: Array | None) -> Array:
    y = x @ kernel
    return y if bias is None else y + bias


@_scoped
def _dense_fwd(x, kernel, bias):
    return _dense(x, kernel, bias), (x, kernel, bias is None)


@_scoped
def _dense_bwd(residuals, dy):
    x, kernel, no_bias = residuals
    x2d, dy2d = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    bias_grad = None if no_bias else dy2d.sum(axis=0)
    return dy @ kernel.T, _weight_grad(x2d, dy2d), bias_grad


_dense.defvjp(_dense_fwd, _dense_bwd)


@_scoped
def dense(x: Array, kernel: Array, bias: Array | None = None) -> Array:
    """x @ kernel (+ bias) with a kernel gradient that runs at full speed on XLA:CPU (`_weight_grad`)."""
    return _dense(x, kernel, bias)


@_scoped
def attention(q: Array, k: Array, v: Array, bias: Array | None) -> Array:
    """softmax(q k^T + bias) v for q, k, v (batch, length, heads, head_dim), q pre-scaled; scores and softmax
    in fp32. Computed head-major, (batch, heads, length, head_dim), by `_attention`."""
    heads_first = lambda a: a.transpose(0, 2, 1, 3)  # noqa: E731
    return heads_first(_attention(heads_first(q), heads_first(k), heads_first(v), bias))


@jax.custom_vjp
def _attention(q: Array, k: Array, v: Array, bias: Array | None) -> Array:
    """The hand-written backward keeps only the probabilities and the output, and gets softmax's row term from
    rowsum(dO * O) (d wide) rather than rowsum(dP * P) (length wide), as FlashAttention does: one-core
    training step 1.3% (tiny) and 1.8% (small, 128 tokens) faster than autodiff through the same einsums."""
    return _attention_fwd(q, k, v, bias)[0]


@_scoped
def _attention_fwd(q, k, v, bias):
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(scores if bias is None else scores + bias, axis=-1)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v)
    return out, (q, k, v, probs, out)


@_scoped
def _attention_bwd(residuals, d_out):
    q, k, v, probs, out = residuals
    d_probs = jnp.einsum("bhqd,bhkd->bhqk", d_out, v, preferred_element_type=jnp.float32)
    d_v = _keys_grad(probs.astype(d_out.dtype), d_out)
    row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    d_scores = (probs * (d_probs - row)).astype(q.dtype)
    d_q = jnp.einsum("bhqk,bhkd->bhqd", d_scores, k)
    d_k = _keys_grad(d_scores, q)
    return d_q, d_k, d_v, None  # the bias comes from the padding mask: no gradient


def _keys_grad(a: Array, b: Array) -> Array:
    """a^T b per head for a (batch, heads, q, k) and b (batch, heads, q, d): the gradients of k and v.

    Like `_weight_grad`: this contracts the query axis, which is not a's minor one, so XLA:CPU would run it
    on its Eigen fallback (about 20 GFLOP/s per core at 65 tokens). A materialised a^T (64 KB per head at 128
    tokens) puts it on YNNPACK: a tiny-config training step 1.4-3.3% faster (three interleaved A/B runs).
    """
    a_t = jax.lax.optimization_barrier(jnp.swapaxes(a, -1, -2))
    return jnp.einsum("bhkq,bhqd->bhkd", a_t, b)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _conv(x: Array, kernel: Array, spec: ConvSpec) -> Array:
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=spec.stride, padding=spec.padding, rhs_dilation=spec.dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=spec.groups,
        preferred_element_type=jnp.float32)


# Elements of input plus output gradient per slice of the batch in the kernel gradient: about what stays in cache
# (benchmarks/conv_paths.py measured 2^19..2^20 best across RN50's shapes), and at most this many slices, so that
# a large per-device batch does not unroll into hundreds of convolutions.
SLICE_ELEMENTS = 2 ** 20
MAX_SLICES = 16


def kernel_grad_in_slices(x: Array, kernel: Array, dy: Array, spec: ConvSpec) -> Array:
    """The kernel gradient summed over slices of the batch. XLA:CPU computes it as one convolution whose kernel is
    the whole output gradient; over the whole batch at 56x56 or 112x112 that runs several times slower than over
    a few examples at a time. The slices take every k-th example (a reshape, then an index on the new unsharded
    axis), so a batch sharded over a mesh is sliced on each device without moving data."""
    n = x.shape[0]
    per_example = math.prod(x.shape[1:]) + math.prod(dy.shape[1:])
    size = max(1, min(n, SLICE_ELEMENTS // per_example), -(-n // MAX_SLICES))
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
def _sliced_conv(x: Array, kernel: Array, spec: ConvSpec) -> Array:
    return _conv(x, kernel, spec)


@_scoped
def _sliced_conv_fwd(x, kernel, spec):
    return _conv(x, kernel, spec), (x, kernel)


@_scoped
def _sliced_conv_bwd(spec, residuals, dy):
    x, kernel = residuals
    dy = dy.astype(jnp.float32)
    dx = jax.vjp(lambda v: _conv(v, kernel, spec), x)[1](dy)[0]
    return dx, kernel_grad_in_slices(x, kernel, dy, spec)


_sliced_conv.defvjp(_sliced_conv_fwd, _sliced_conv_bwd)


@_scoped
def conv2d(x: Array, kernel: Array, spec: ConvSpec) -> Array:
    """The convolution (NHWC, HWIO, fp32 accumulation) in x's dtype: a 1x1 one without groups as one matmul
    (`pointwise`), any other with XLA's input gradient and the kernel gradient over batch slices."""
    if kernel.shape[:2] == (1, 1) and spec.groups == 1 and spec.padding == ((0, 0), (0, 0)):
        return pointwise(x, kernel, spec.stride)
    return _sliced_conv(x, kernel, spec).astype(x.dtype)


def pointwise(x: Array, kernel: Array, stride: tuple[int, int]) -> Array:
    """A 1x1 convolution as one (pixels, in) @ (in, out) matmul (a strided one reads every stride-th pixel, which
    is what the convolution computes). XLA:CPU runs this form's backward pass several times faster than the
    convolution's (`benchmarks/conv_paths.py`)."""
    if stride != (1, 1):
        x = x[:, ::stride[0], ::stride[1]]
    n, h, w, c = x.shape
    y = jnp.matmul(x.reshape(n * h * w, c), kernel[0, 0].astype(x.dtype), preferred_element_type=jnp.float32)
    return y.reshape(n, h, w, -1).astype(x.dtype)
