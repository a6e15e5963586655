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


# -- the CLIP TensorFlow & ROCO report's hybrid loss (--hybrid_form report) ------------------------------------

def _report_hybrid_loss(image_f, text_f, T, alpha):
    """The report's eqs. 1-8 as printed, in NumPy (float64), with Keras' losses written out.

    eq. 1  I_e = l2_normalize(I_f), T_e = l2_normalize(T_f)
    eq. 2  logits = (T_e . I_e^T) / T                                  (rows: texts)
    eq. 3  I_sim = I_e . I_e^T,  T_sim = T_e . T_e^T
    eq. 4  I_target = softmax((I_sim + T_sim) / T),  T_target = I_target^T
    eq. 5  loss_soft = (CCE(I_target, logits^T) + CCE(T_target, logits)) / 2
    eq. 6  labels = [0, 1, ..., n - 1]
    eq. 7  loss_hard = (SparseCCE(labels, logits^T) + SparseCCE(labels, logits)) / 2
    eq. 8  loss = alpha * loss_soft + (1 - alpha) * loss_hard
    Keras' categorical CE (from_logits) is -sum(y_true * log_softmax(y_pred)) per row, its labels used as given
    (not renormalised), then averaged over the batch; softmax is over the last axis.
    """
    I_e, T_e = _unit(image_f.astype(np.float64)), _unit(text_f.astype(np.float64))
    logits = T_e @ I_e.T / T
    I_sim, T_sim = I_e @ I_e.T, T_e @ T_e.T
    I_target = np.exp(_log_softmax((I_sim + T_sim) / T, -1))
    T_target = I_target.T

    def cce(y_true, y_pred):
        return np.mean(-(y_true * _log_softmax(y_pred, -1)).sum(-1))

    def sparse_cce(labels, y_pred):
        return np.mean(-_log_softmax(y_pred, -1)[np.arange(len(labels)), labels])

    loss_soft = (cce(I_target, logits.T) + cce(T_target, logits)) / 2
    labels = np.arange(len(logits))
    loss_hard = (sparse_cce(labels, logits.T) + sparse_cce(labels, logits)) / 2
    return alpha * loss_soft + (1 - alpha) * loss_hard


def _ours_report(image, text, T, alpha):
    image, text = jnp.asarray(image, jnp.float32), jnp.asarray(text, jnp.float32)
    return losses.hybrid_loss_report(text @ image.T / T, image, text, 1.0 / T, alpha)


@pytest.fixture
def related():
    """Embeddings with near-duplicates (pairs 0/1 and 2/3 alike), so the soft targets are not the identity."""
    rng = np.random.default_rng(4)
    image, text = rng.normal(size=(6, 8)), rng.normal(size=(6, 8))
    image[1], text[1] = image[0] + 0.3 * rng.normal(size=8), text[0] + 0.3 * rng.normal(size=8)
    image[3], text[3] = image[2] + 0.3 * rng.normal(size=8), text[2] + 0.3 * rng.normal(size=8)
    return _unit(image), _unit(text)


@pytest.mark.parametrize("T,alpha", [(0.07, 0.5), (1.0, 0.5), (0.5, 1.0), (2.0, 0.3), (0.07, 0.0)])
def test_report_hybrid_loss_matches_the_reports_equations(related, T, alpha):
    image, text = related
    np.testing.assert_allclose(float(_ours_report(image, text, T, alpha)),
                               _report_hybrid_loss(image, text, T, alpha), rtol=2e-5)


def test_report_form_differs_from_ours_and_from_renormalised_targets(related):
    """The checks above can fail: at T = 1 our form (row targets with the text rows) and a form that renormalises
    T_target's rows both give other values."""
    image, text = related
    report = _report_hybrid_loss(image, text, 1.0, 1.0)
    ours = float(losses.hybrid_loss(jnp.asarray(text @ image.T, jnp.float32), jnp.asarray(image, jnp.float32),
                                    jnp.asarray(text, jnp.float32), alpha=1.0, temperature=1.0))
    assert abs(ours - report) > 1e-3
    I_target = np.exp(_log_softmax(image @ image.T + text @ text.T, -1))
    assert np.abs(I_target.T.sum(-1) - 1).max() > 1e-2  # T_target's rows do not sum to 1
    renormalised = I_target.T / I_target.T.sum(-1, keepdims=True)
    logits = text @ image.T
    soft = (np.mean(-(I_target * _log_softmax(logits.T, -1)).sum(-1))
            + np.mean(-(renormalised * _log_softmax(logits, -1)).sum(-1))) / 2
    assert abs(soft - report) > 1e-3


def test_report_targets_pass_the_gradient_as_keras_does(related):
    """TF's softmax cross-entropy backpropagates into its labels: the derivative along a direction matches the
    NumPy transcription's finite difference, which differs from the derivative with the targets stopped."""
    image, text = related
    direction = np.random.default_rng(5).normal(size=image.shape)
    T, alpha, eps = 0.5, 0.7, 1e-5
    numeric = (_report_hybrid_loss(image + eps * direction, text, T, alpha)
               - _report_hybrid_loss(image - eps * direction, text, T, alpha)) / (2 * eps)

    def f(i, stop=False):
        i = i / jnp.linalg.norm(i, axis=-1, keepdims=True)  # eq. 1
        t = jnp.asarray(text, jnp.float32)
        target_embeds = jax.lax.stop_gradient(i) if stop else i  # stop: the targets as constants
        return losses.hybrid_loss_report(t @ i.T / T, target_embeds, t, 1.0 / T, alpha)

    x, v = jnp.asarray(image, jnp.float32), jnp.asarray(direction, jnp.float32)
    analytic = float(jax.jvp(f, (x,), (v,))[1])
    stopped = float(jax.jvp(lambda i: f(i, stop=True), (x,), (v,))[1])
    np.testing.assert_allclose(analytic, numeric, rtol=1e-3)
    assert abs(stopped - numeric) > 1e-2 * abs(numeric)


def test_compute_loss_reads_the_form_the_scale_and_a_learned_alpha(related):
    image, text = (jnp.asarray(x, jnp.float32) for x in related)
    scale = jnp.asarray(1 / 0.07, jnp.float32)
    out = type("Out", (), {"logits_per_text": scale * text @ image.T, "image_embeds": image, "text_embeds": text})
    config = losses.LossConfig(name="hybrid", hybrid_form="report", hybrid_alpha=0.5)
    np.testing.assert_allclose(float(losses.compute_loss(out, config, None, losses.LossParams(logit_scale=scale))),
                               _report_hybrid_loss(related[0], related[1], 0.07, 0.5), rtol=2e-5)
    with pytest.raises(ValueError, match="logit scale"):
        losses.compute_loss(out, config)
    # A learned alpha: sigmoid of the extra parameter, started at --hybrid_alpha; its gradient is the
    # derivative of alpha * soft + (1 - alpha) * hard.
    params = {"logit_scale": jnp.zeros(()), **losses.alpha_param(0.3)}
    model_params, alpha = losses.split_params(params)
    assert set(model_params) == {"logit_scale"} and float(alpha) == pytest.approx(0.3, rel=1e-6)
    soft = _report_hybrid_loss(related[0], related[1], 0.07, 1.0)
    hard = _report_hybrid_loss(related[0], related[1], 0.07, 0.0)

    def loss_of(p):
        return losses.compute_loss(out, config, None, losses.LossParams(scale, losses.split_params(p)[1]))

    grad = jax.grad(loss_of)(params)[losses.ALPHA_PARAM]
    np.testing.assert_allclose(float(grad), 0.3 * 0.7 * (soft - hard), rtol=1e-4)
