"""Loss functions against straightforward NumPy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medclip.training import losses


def _log_softmax(x, axis):
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    image, text = _unit(rng.normal(size=(6, 8))), _unit(rng.normal(size=(6, 8)))
    return image.astype(np.float32), text.astype(np.float32), (10.0 * text @ image.T).astype(np.float32)


def test_clip_loss_matches_numpy(batch):
    _, _, logits = batch
    ref = -(np.mean(np.diag(_log_softmax(logits, 1))) + np.mean(np.diag(_log_softmax(logits, 0)))) / 2
    np.testing.assert_allclose(float(losses.clip_loss(jnp.asarray(logits))), ref, rtol=1e-5)


def test_clip_loss_is_low_for_matched_pairs():
    logits = 100.0 * np.eye(4, dtype=np.float32)
    assert float(losses.clip_loss(jnp.asarray(logits))) < 1e-6
    assert float(losses.clip_loss(jnp.zeros((4, 4)))) == pytest.approx(np.log(4), rel=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_hybrid_loss_matches_numpy(batch, alpha):
    image, text, logits = batch
    sim = image @ image.T + text @ text.T
    targets = np.exp(_log_softmax(sim / 1.0, 1))
    soft = (-(targets * _log_softmax(logits, 1)).sum(1).mean() - (targets.T * _log_softmax(logits.T, 1)).sum(1).mean()) / 2
    hard = -(np.mean(np.diag(_log_softmax(logits, 1))) + np.mean(np.diag(_log_softmax(logits, 0)))) / 2
    ours = losses.hybrid_loss(jnp.asarray(logits), jnp.asarray(image), jnp.asarray(text), alpha=alpha)
    np.testing.assert_allclose(float(ours), alpha * soft + (1 - alpha) * hard, rtol=1e-5)


def test_hybrid_targets_carry_no_gradient(batch):
    image, text, logits = batch
    grad = jax.grad(lambda i: losses.hybrid_loss(jnp.asarray(logits), i, jnp.asarray(text), alpha=1.0))(
        jnp.asarray(image))
    assert float(jnp.abs(grad).max()) == 0.0


def test_sigmoid_loss_matches_numpy(batch):
    _, _, logits = batch
    logits = logits - 5.0
    labels = 2 * np.eye(6) - 1
    ref = -np.sum(np.log(1 / (1 + np.exp(-labels * logits)))) / 6
    np.testing.assert_allclose(float(losses.sigmoid_loss(jnp.asarray(logits))), ref, rtol=1e-5)
