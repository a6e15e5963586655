"""Contrastive losses over the global batch, each a pure function of logits (and embeddings), and the one
registry that training and evaluation both call (`compute_loss(out, config)`).

With `jax.jit` over a device mesh the logits are the global (batch, batch) matrix, so every device's
examples serve as negatives for every other's; XLA inserts the gathers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import optax


def clip_loss(logits_per_text: jax.Array) -> jax.Array:
    """Symmetric InfoNCE: mean of text->image and image->text cross-entropy with the diagonal as targets."""
    labels = jnp.arange(logits_per_text.shape[0])
    logits = logits_per_text.astype(jnp.float32)
    text_loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    image_loss = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
    return (text_loss + image_loss) / 2


def hybrid_loss(logits_per_text: jax.Array, image_embeds: jax.Array, text_embeds: jax.Array,
                alpha: float = 0.5, temperature: float = 1.0) -> jax.Array:
    """alpha * soft-target CE + (1 - alpha) * hard-target CE.

    Soft targets = softmax((image-image + text-text similarities) / T): near-duplicate captions in ROCO
    ("Chest x-ray showing ...") are not pushed apart as hard negatives. Targets carry no gradient.
    """
    logits = logits_per_text.astype(jnp.float32)
    sim = (image_embeds @ image_embeds.T + text_embeds @ text_embeds.T).astype(jnp.float32)
    targets = jax.lax.stop_gradient(jax.nn.softmax(sim / temperature, axis=-1))
    soft = (optax.softmax_cross_entropy(logits, targets).mean()
            + optax.softmax_cross_entropy(logits.T, targets.T).mean()) / 2
    return alpha * soft + (1 - alpha) * clip_loss(logits)


def sigmoid_loss(logits_per_text: jax.Array) -> jax.Array:
    """SigLIP: every (text, image) pair is an independent binary problem; logits include the learned bias.
    Normalised per text as in the SigLIP paper (sum over images, mean over texts)."""
    logits = logits_per_text.astype(jnp.float32)
    labels = 2 * jnp.eye(logits.shape[0]) - 1  # +1 on the diagonal, -1 elsewhere
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / logits.shape[0]


class LossConfig(Protocol):
    """What a loss may read from its configuration (`medclip.training.step.StepConfig` is one)."""

    loss: str
    hybrid_alpha: float
    hybrid_temperature: float


class ModelOutput(Protocol):
    """What a loss may read from the model output (`medclip.models.hybrid.HybridCLIPOutput` is one)."""

    logits_per_text: jax.Array  # (texts, images): scale * text_embeds @ image_embeds.T (+ bias)
    image_embeds: jax.Array  # (batch, dim), L2-normalised
    text_embeds: jax.Array


LOSSES: dict[str, Callable[[Any, Any], jax.Array]] = {
    "clip": lambda out, config: clip_loss(out.logits_per_text),
    "hybrid": lambda out, config: hybrid_loss(out.logits_per_text, out.image_embeds, out.text_embeds,
                                              config.hybrid_alpha, config.hybrid_temperature),
    "sigmoid": lambda out, config: sigmoid_loss(out.logits_per_text),
}


def compute_loss(out: ModelOutput, config: LossConfig) -> jax.Array:
    """The configured loss of a model output: the training step and evaluation both call this."""
    try:
        loss = LOSSES[config.loss]
    except KeyError:
        raise ValueError(f"unknown loss {config.loss!r}; choose from {', '.join(LOSSES)}") from None
    return loss(out, config)
