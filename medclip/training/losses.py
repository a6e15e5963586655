"""Contrastive losses over the global batch, each a pure function of logits (and embeddings, and for the
concept loss the batch's concept ids and caption groups), and the one registry that training and evaluation
both call (`compute_loss(out, config, batch)`, `config` a `LossConfig`).

With `jax.jit` over a device mesh the logits are the global (batch, batch) matrix, so every device's
examples serve as negatives for every other's; XLA inserts the gathers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medclip.training.errors import ConfigError, check_choice
from medclip.training.sigmoid_ring import SIGMOID_FORMS

if TYPE_CHECKING:
    from medclip.training.arguments import TrainingArguments


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


def hybrid_loss_report(logits_per_text: jax.Array, image_embeds: jax.Array, text_embeds: jax.Array,
                       logit_scale: jax.Array, alpha: float | jax.Array = 0.5) -> jax.Array:
    """The CLIP TensorFlow & ROCO report's hybrid loss (its eqs. 1-8), written as the report prints it.

    One temperature T = 1 / logit_scale scales the logits (eq. 2, `logits_per_text` = T_e I_e^T / T) and
    sharpens the soft targets I_target = softmax((I_sim + T_sim) / T) (eqs. 3-4), so at T = 0.07 the targets are
    nearly the identity; T_target = I_target^T. Eq. 5 pairs I_target with the image rows (logits^T) and T_target
    with the text rows, through Keras' categorical cross-entropy, which does not renormalise its labels (the rows
    of T_target need not sum to 1) and lets the gradient reach the targets (TF's softmax cross-entropy
    backpropagates into labels). Eqs. 6-7: the index-target sparse cross-entropy (`clip_loss`); eq. 8:
    alpha * soft + (1 - alpha) * hard.
    """
    logits = logits_per_text.astype(jnp.float32)
    sim = (image_embeds @ image_embeds.T + text_embeds @ text_embeds.T).astype(jnp.float32)
    image_targets = jax.nn.softmax(sim * logit_scale, axis=-1)
    text_targets = image_targets.T
    soft = (optax.softmax_cross_entropy(logits.T, image_targets).mean()
            + optax.softmax_cross_entropy(logits, text_targets).mean()) / 2
    return alpha * soft + (1 - alpha) * clip_loss(logits)


def sigmoid_loss(logits_per_text: jax.Array) -> jax.Array:
    """SigLIP: every (text, image) pair is an independent binary problem; logits include the learned bias.
    Normalised per text as in the SigLIP paper (sum over images, mean over texts)."""
    logits = logits_per_text.astype(jnp.float32)
    labels = 2 * jnp.eye(logits.shape[0]) - 1  # +1 on the diagonal, -1 elsewhere
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / logits.shape[0]


FALSE_NEGATIVES = ("positive", "mask", "none")


def concept_similarity(concept_ids: jax.Array) -> jax.Array:
    """(batch, K) int ids of each example's concept set (distinct within a row, -1 padding) -> (batch, batch)
    Jaccard overlap |A & B| / |A | B|; 0 where both sets are empty."""
    valid = concept_ids >= 0
    same = ((concept_ids[:, None, :, None] == concept_ids[None, :, None, :])
            & valid[:, None, :, None] & valid[None, :, None, :])  # (batch, batch, K, K)
    shared = same.sum(axis=(2, 3)).astype(jnp.float32)
    sizes = valid.sum(axis=-1).astype(jnp.float32)
    union = sizes[:, None] + sizes[None, :] - shared
    return jnp.where(union > 0, shared / jnp.maximum(union, 1.0), 0.0)


def concept_loss(logits_per_text: jax.Array, concept_ids: jax.Array, caption_group: jax.Array,
                 weight: float = 0.5, false_negatives: str = "positive") -> jax.Array:
    """Symmetric cross-entropy against concept-aware targets (MedCLIP's semantic matching, Wang et al. 2022).

    targets = (1 - weight) * hard + weight * soft, where soft is the Jaccard overlap of the examples' concept
    sets (1 on the diagonal), row-normalised. Duplicates (pairs with the same normalised caption, or the same
    non-empty concept set) are false negatives of the identity target, handled as `false_negatives` says:
      positive: the hard target is uniform over the example's duplicates (itself included);
      mask:     duplicates leave the softmax (neither positives nor negatives: zero gradient) and the targets;
      none:     the identity, as the clip loss (weight 0 and none is exactly `clip_loss`).
    The similarity matrices are symmetric, so the same targets serve both directions. No gradient flows into
    the targets (they depend on ids only).
    """
    if false_negatives not in FALSE_NEGATIVES:
        raise ValueError(f"false_negatives must be one of {', '.join(FALSE_NEGATIVES)}, not {false_negatives!r}")
    logits = logits_per_text.astype(jnp.float32)
    n = logits.shape[0]
    eye = jnp.eye(n, dtype=bool)
    overlap = concept_similarity(concept_ids)
    has_concepts = (concept_ids >= 0).any(axis=-1)
    duplicate = ((caption_group[:, None] == caption_group[None, :])
                 | ((overlap == 1.0) & has_concepts[:, None] & has_concepts[None, :]) | eye)
    overlap = jnp.where(eye, 1.0, overlap)
    if false_negatives == "positive":
        hard = duplicate / duplicate.sum(axis=-1, keepdims=True)
    else:
        hard = eye.astype(jnp.float32)
    if false_negatives == "mask":
        masked = duplicate & ~eye
        overlap = jnp.where(masked, 0.0, overlap)
        logits = jnp.where(masked, -1e9, logits)  # finite: 0 * log_softmax stays 0 where the target is 0
    soft = overlap / overlap.sum(axis=-1, keepdims=True)
    targets = jax.lax.stop_gradient((1 - weight) * hard + weight * soft)
    return (optax.softmax_cross_entropy(logits, targets).mean()
            + optax.softmax_cross_entropy(logits.T, targets).mean()) / 2


HYBRID_FORMS = ("ours", "report")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Every setting of the contrastive loss, from the flags of the same names (`from_args`; `name` is --loss).
    The train step and the evaluation loss take it whole: a new loss setting is a field here, not an argument
    threaded through the trainer."""

    name: str = "clip"  # a key of LOSSES
    hybrid_alpha: float = 0.5  # hybrid: share of the soft targets (the start, when learned)
    hybrid_temperature: float = 1.0  # hybrid ours: the soft targets' temperature
    hybrid_form: str = "ours"  # ours | report (hybrid_loss_report: the CLIP-TF report's eqs. 1-8)
    hybrid_alpha_learnable: bool = False  # hybrid: alpha trained beside the model (ALPHA_PARAM)
    concept_target_weight: float = 0.5  # concept: share of the concept-overlap soft targets
    false_negatives: str = "positive"  # concept: positive | mask | none (concept_loss)
    sigmoid_form: str = "gathered"  # sigmoid: gathered | ring (training.sigmoid_ring: over the step's mesh)

    @classmethod
    def from_args(cls, args: TrainingArguments) -> LossConfig:
        return cls(name=args.loss, hybrid_alpha=args.hybrid_alpha, hybrid_temperature=args.hybrid_temperature,
                   hybrid_form=args.hybrid_form, hybrid_alpha_learnable=args.hybrid_alpha_learnable,
                   concept_target_weight=args.concept_target_weight, false_negatives=args.false_negatives,
                   sigmoid_form=args.sigmoid_form)

    def check(self) -> None:
        """ConfigError naming the flag, for a setting no loss can use (ranges: arguments.FLAG_RANGES)."""
        check_choice("--loss", self.name, LOSSES)
        check_choice("--hybrid_form", self.hybrid_form, HYBRID_FORMS)
        check_choice("--sigmoid_form", self.sigmoid_form, SIGMOID_FORMS)
        if self.sigmoid_form != "gathered" and self.name != "sigmoid":
            raise ConfigError(f"--sigmoid_form {self.sigmoid_form} computes --loss sigmoid, not --loss {self.name}: "
                              "drop the flag or use --loss sigmoid")
        if self.name == "concept":
            check_choice("--false_negatives", self.false_negatives, FALSE_NEGATIVES)
        if self.hybrid_form == "report" and self.hybrid_temperature != 1.0:
            raise ConfigError("--hybrid_temperature sets --hybrid_form ours's target temperature; the report form "
                              "uses the model's logit temperature for the targets too: drop one of them")
        if self.hybrid_alpha_learnable and self.name != "hybrid":
            raise ConfigError("--hybrid_alpha_learnable learns the alpha of --loss hybrid: add it, or drop the flag")
        if self.hybrid_alpha_learnable and not 0 < self.hybrid_alpha < 1:
            raise ConfigError(f"--hybrid_alpha_learnable starts at --hybrid_alpha, which must be in (0, 1), not "
                              f"{self.hybrid_alpha}")


class ModelOutput(Protocol):
    """What a loss may read from the model output (`medclip.models.hybrid.HybridCLIPOutput` is one)."""

    logits_per_text: jax.Array  # (texts, images): scale * text_embeds @ image_embeds.T (+ bias)
    image_embeds: jax.Array  # (batch, dim), L2-normalised
    text_embeds: jax.Array


@dataclasses.dataclass(frozen=True)
class LossParams:
    """Trained values a loss may read besides the model output: the logit scale 1 / T (clamped, as the model
    applies it; the report's hybrid form needs it) and a learned hybrid alpha (None: the configured one)."""

    logit_scale: jax.Array | None = None
    hybrid_alpha: jax.Array | None = None


# A learned hybrid alpha (--hybrid_alpha_learnable) is trained beside the model's parameters, under this key of
# the train state's params: alpha = sigmoid(value), so it stays in (0, 1).
ALPHA_PARAM = "hybrid_alpha_logit"


def alpha_param(alpha: float) -> dict[str, jax.Array]:
    """The extra params entry that starts a learned alpha at `alpha` (in (0, 1))."""
    return {ALPHA_PARAM: jnp.asarray(np.log(alpha / (1 - alpha)), jnp.float32)}


def split_params(params: Mapping[str, Any]) -> tuple[dict[str, Any], jax.Array | None]:
    """Train-state params -> (the model's params, the learned alpha or None)."""
    model = {k: v for k, v in params.items() if k != ALPHA_PARAM}
    return model, (jax.nn.sigmoid(params[ALPHA_PARAM]) if ALPHA_PARAM in params else None)


def _concept(out, config, batch, params):
    return concept_loss(out.logits_per_text, batch["concept_ids"], batch["caption_group"],
                        config.concept_target_weight, config.false_negatives)


def _hybrid(out, config, batch, params):
    alpha = config.hybrid_alpha if params.hybrid_alpha is None else params.hybrid_alpha
    if config.hybrid_form == "ours":
        return hybrid_loss(out.logits_per_text, out.image_embeds, out.text_embeds, alpha, config.hybrid_temperature)
    if params.logit_scale is None:
        raise ValueError("--hybrid_form report ties the targets' temperature to the logits': pass the logit scale")
    return hybrid_loss_report(out.logits_per_text, out.image_embeds, out.text_embeds, params.logit_scale, alpha)


# name -> loss(out, config, batch, params); `batch` holds at least the fields BATCH_FIELDS names for that loss.
LOSSES: dict[str, Callable[[Any, LossConfig, Mapping[str, jax.Array], LossParams], jax.Array]] = {
    "clip": lambda out, config, batch, params: clip_loss(out.logits_per_text),
    "hybrid": _hybrid,
    "sigmoid": lambda out, config, batch, params: sigmoid_loss(out.logits_per_text),
    "concept": _concept,
}
# The per-example batch fields (beyond the model's inputs) a loss reads: the data pipeline adds them.
BATCH_FIELDS: dict[str, tuple[str, ...]] = {"concept": ("concept_ids", "caption_group")}


def batch_fields(loss: str) -> tuple[str, ...]:
    return BATCH_FIELDS.get(loss, ())


def compute_loss(out: ModelOutput, config: LossConfig, batch: Mapping[str, jax.Array] | None = None,
                 params: LossParams | None = None) -> jax.Array:
    """The configured loss of a model output: the training step and evaluation both call this. `batch` holds
    the fields the loss needs (`batch_fields(config.name)`); others are ignored. `params`: the trained values
    besides the output (`LossParams`). ConfigError (a ValueError) for a config that `LossConfig.check` refuses."""
    config.check()  # at trace time, once per compilation
    missing = [f for f in batch_fields(config.name) if batch is None or f not in batch]
    if missing:
        raise ValueError(f"--loss {config.name} reads the batch fields {missing}, which this batch lacks "
                         "(the data pipeline adds them with concept_width > 0)")
    return LOSSES[config.name](out, config, batch or {}, params or LossParams())
