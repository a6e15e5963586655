"""The convolution building blocks' fast CPU forms (`medclip.models.kernels.cpu`) against the plain XLA operations they replace: a 1x1 convolution as
a matmul, the CPU kernel gradient summed over batch slices, non-overlapping average pooling as a reshape. Same
values and gradients (fp32), on the shapes where the forms differ: strides, odd sizes, "same" padding, groups,
dilation, batches that do not divide evenly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medclip.models import conv
from medclip.models.kernels import cpu


def _plain_conv(x, kernel, stride, padding, dilation=(1, 1), groups=1):
    return jax.lax.conv_general_dilated(x, kernel, stride, padding, rhs_dilation=dilation,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


def _grads(fn, x, kernel):
    def loss(x, k):
        y = fn(x, k)
        return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape)))  # a gradient that differs per element
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, kernel)


@pytest.mark.parametrize("batch, size, cin, cout, k, stride, pad, dilation, groups", [
    (7, 9, 3, 5, 3, 1, 1, 1, 1),   # a prime batch: slices of one example
    (6, 11, 4, 8, 3, 2, 1, 1, 1),  # strided, odd size
    (4, 8, 6, 6, 3, 1, 2, 2, 3),   # dilated, grouped
    (5, 10, 4, 4, 5, 2, 0, 1, 1),  # no padding
])
def test_conv2d_kernel_gradient_in_batch_slices_equals_xla(monkeypatch, batch, size, cin, cout, k, stride, pad,
                                                            dilation, groups):
    monkeypatch.setattr(cpu, "SLICE_ELEMENTS", 1)  # as small as it goes: as many slices as allowed
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, size, size, cin)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(k, k, cin // groups, cout)), jnp.float32)
    spec = conv.ConvSpec((stride, stride), ((pad, pad), (pad, pad)), (dilation, dilation), groups)
    ours = _grads(lambda x, w: cpu.conv2d(x, w, spec), x, kernel)
    plain = _grads(lambda x, w: _plain_conv(x, w, spec.stride, spec.padding, spec.dilation, groups), x, kernel)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)


def test_slices_are_bounded_for_a_large_batch(monkeypatch):
    """A batch of 64 with the smallest slice budget is cut into at most 16 slices of 4 (unrolled, not 64)."""
    monkeypatch.setattr(cpu, "SLICE_ELEMENTS", 1)
    x, kernel = jnp.ones((64, 4, 4, 2)), jnp.ones((3, 3, 2, 2))
    spec = conv.ConvSpec((1, 1), ((1, 1), (1, 1)), (1, 1), 1)
    jaxpr = jax.make_jaxpr(lambda x, dy: cpu.kernel_grad_in_slices(x, kernel, dy, spec))(x, x)
    convs = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    grads = [e for e in convs if e.outvars[0].aval.shape != (4, 4, 4, 2)]  # vjp also traces each slice's forward
    assert len(grads) == 16 and {e.invars[0].aval.shape for e in grads} == {(4, 4, 4, 2)}


@pytest.mark.parametrize("stride, size, padding", [(1, 6, 0), (2, 7, 0), (2, 8, "same"), (3, 10, 0)])
def test_pointwise_conv_is_the_convolution(stride, size, padding):
    layer = conv.Conv2d(5, 7, 1, stride=stride, padding=padding, bias=True, rngs=nnx.Rngs(0))
    layer.bias[...] = jnp.arange(7.0)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, size, size, 5)), jnp.float32)
    pad = [conv.same_padding(size, 1, stride)] * 2 if padding == "same" else [(0, 0), (0, 0)]
    expected = _plain_conv(x, layer.kernel[...], (stride, stride), pad) + layer.bias[...]
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(expected), rtol=1e-5, atol=1e-5)
    ours = _grads(lambda x, w: cpu.pointwise(x, w, (stride, stride)), x, layer.kernel[...])
    plain = _grads(lambda x, w: _plain_conv(x, w, (stride, stride), pad), x, layer.kernel[...])
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kernel, stride, size", [(2, None, 8), (2, None, 7), (3, None, 11), (3, 2, 9)])
def test_average_pool_is_torchs(kernel, stride, size):
    """torch.nn.AvgPool2d(kernel, stride) without padding: windows that do not fit are dropped."""
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, size, size + 1, 3)), jnp.float32)
    s = stride or kernel
    summed = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, kernel, kernel, 1), (1, s, s, 1), "VALID")
    np.testing.assert_allclose(np.asarray(conv.avg_pool(x, kernel, stride)), np.asarray(summed / kernel ** 2),
                               rtol=1e-6, atol=1e-6)
    ours = jax.grad(lambda v: jnp.sum(conv.avg_pool(v, kernel, stride) ** 2))(x)
    plain = jax.grad(lambda v: jnp.sum((jax.lax.reduce_window(v, 0.0, jax.lax.add, (1, kernel, kernel, 1),
                                                              (1, s, s, 1), "VALID") / kernel ** 2) ** 2))(x)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(plain), rtol=1e-6, atol=1e-6)
