"""Masked-language modelling (PMC-CLIP's second objective), as pure functions the jitted train step calls.

Masking happens in the step, from the step's key: no extra pipeline state, and a resumed run masks exactly as
an uninterrupted one. BERT's rule: each real, non-special token is selected with `probability`; of the
selected, 80% become the mask token, 10% a random non-special token, 10% stay as they are. Padding and special
tokens ([CLS], [SEP], [PAD], ...) are never selected. The loss is the cross-entropy at the selected positions
only, averaged over all of them in the batch (PMC-CLIP's `F.nll_loss(..., ignore_index=0)`).

PMC-CLIP itself masks whole words on the caption string before tokenising (src/training/dataset/utils.py,
`base_masker`); we mask tokens (transformers' DataCollatorForLanguageModeling), which keeps captions tokenised
once and the labels aligned with the input.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

MASK_STREAM = 0x4D4C4D  # folded into the step's dropout key: the masking's own random stream


@dataclasses.dataclass(frozen=True)
class MaskingConfig:
    probability: float  # share of eligible tokens selected (0.15)
    mask_token_id: int
    special_ids: tuple[int, ...]  # never selected (the tokenizer's all_special_ids)
    vocab_size: int  # random replacements are drawn from [0, vocab_size) minus special_ids

    @classmethod
    def from_tokenizer(cls, tokenizer, probability: float = 0.15) -> MaskingConfig:
        if getattr(tokenizer, "mask_token_id", None) is None:
            raise ValueError("masked-language modelling needs a tokenizer with a mask token")
        return cls(probability=probability, mask_token_id=int(tokenizer.mask_token_id),
                   special_ids=tuple(sorted({int(i) for i in tokenizer.all_special_ids})),
                   vocab_size=len(tokenizer))

    def replacement_ids(self) -> np.ndarray:
        return np.setdiff1d(np.arange(self.vocab_size), np.asarray(self.special_ids)).astype(np.int32)


def mask_tokens(rng: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
                config: MaskingConfig) -> tuple[jax.Array, jax.Array]:
    """-> (masked input_ids, selected (batch, length) bool): the positions the MLM loss is computed at."""
    select_rng, action_rng, token_rng = jax.random.split(rng, 3)
    special = jnp.isin(input_ids, jnp.asarray(config.special_ids, input_ids.dtype))
    eligible = (attention_mask > 0) & ~special
    selected = eligible & (jax.random.uniform(select_rng, input_ids.shape) < config.probability)
    action = jax.random.uniform(action_rng, input_ids.shape)
    replacements = jnp.asarray(config.replacement_ids())
    random_ids = replacements[jax.random.randint(token_rng, input_ids.shape, 0, len(replacements))]
    masked = jnp.where(selected & (action < 0.8), config.mask_token_id, input_ids)
    masked = jnp.where(selected & (action >= 0.8) & (action < 0.9), random_ids.astype(input_ids.dtype), masked)
    return masked, selected


def mlm_loss_and_accuracy(logits: jax.Array, labels: jax.Array, selected: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits (batch, length, vocab), labels (batch, length) = the unmasked input_ids, selected (batch, length)
    -> (mean cross-entropy, accuracy) over the selected positions; both 0 when nothing was selected."""
    weights = selected.astype(jnp.float32)
    count = jnp.maximum(weights.sum(), 1.0)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return (losses * weights).sum() / count, (correct * weights).sum() / count
