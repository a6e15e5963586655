"""Masked-language modelling (PMC-CLIP's second objective), as pure functions the jitted train step calls.

Masking happens in the step, from the step's key: no extra pipeline state, and a resumed run masks exactly as
an uninterrupted one. Two rules:

- token (BERT's, transformers' DataCollatorForLanguageModeling): each real, non-special token is selected with
  `probability`; of the selected, 80% become the mask token, 10% a random non-special token, 10% stay. The loss
  is the cross-entropy at the selected positions, averaged over all of them in the batch.
- whole_word (PMC-CLIP's `base_masker`, src/training/dataset/utils.py): the same draw per whitespace-separated
  word of the caption (`caption.split()`), so a word's tokens are masked, replaced or kept together. PMC-CLIP
  builds the masked caption as a string and tokenises it again, so its details follow: a randomly replaced word
  becomes ONE random vocabulary token (the rest of the sequence moves left, while the labels stay where the
  original caption's tokens were); the labels are the caption re-tokenised with every unselected word as [PAD],
  and `F.nll_loss(..., ignore_index=0)` skips only [PAD], so [CLS] and [SEP] are targets too.

Padding and special tokens are never selected. The step needs, for whole words, each token's "starts a word"
flag (`word_starts`, computed once per caption on the host from the tokenizer's offsets).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medclip.training.errors import check_choice

MASK_STREAM = 0x4D4C4D  # folded into the step's dropout key: the masking's own random stream


MASKINGS = ("token", "whole_word")
_WHITESPACE = re.compile(r"\s")  # str.split()'s separators


@dataclasses.dataclass(frozen=True)
class MaskingConfig:
    probability: float  # share of eligible tokens (words, with whole_word) selected (0.15)
    mask_token_id: int
    special_ids: tuple[int, ...]  # never selected (the tokenizer's all_special_ids)
    vocab_size: int  # random replacements are drawn from [0, vocab_size) minus special_ids
    whole_word: bool = False  # PMC-CLIP's whole-word rule (module docstring)
    pad_token_id: int = 0  # fills the end of a sequence that a whole-word replacement shortened

    @classmethod
    def from_tokenizer(cls, tokenizer, probability: float = 0.15, masking: str = "token") -> MaskingConfig:
        if getattr(tokenizer, "mask_token_id", None) is None:
            raise ValueError("masked-language modelling needs a tokenizer with a mask token")
        check_choice("--mlm_masking", masking, MASKINGS)
        return cls(probability=probability, mask_token_id=int(tokenizer.mask_token_id),
                   special_ids=tuple(sorted({int(i) for i in tokenizer.all_special_ids})),
                   vocab_size=len(tokenizer), whole_word=masking == "whole_word",
                   pad_token_id=int(tokenizer.pad_token_id or 0))

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


def word_starts(tokenizer, texts: list[str], input_ids: np.ndarray) -> np.ndarray:
    """(len(texts), length) int32: 1 where a real, non-special token begins a whitespace-separated word of its
    text (what PMC-CLIP's `caption.split()` calls a word; "x-ray," is one word of four tokens). `input_ids` are
    the texts as the pipeline tokenised them (padded to `length`); the offsets come from the same tokenizer,
    which must be a fast one. ValueError if it is not, or if it tokenises differently."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("whole-word masking reads token offsets, which only a fast tokenizer gives")
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=input_ids.shape[1],
                        return_offsets_mapping=True, return_special_tokens_mask=True, return_token_type_ids=False,
                        return_tensors="np")
    if not np.array_equal(encoded["input_ids"], input_ids):
        raise ValueError("the tokenizer does not reproduce the captions' input_ids")
    real = (encoded["attention_mask"] > 0) & (encoded["special_tokens_mask"] == 0)
    offsets = encoded["offset_mapping"]
    starts = np.zeros(input_ids.shape, np.int32)
    for row, text in enumerate(texts):
        tokens = np.flatnonzero(real[row])
        if tokens.size == 0:
            continue
        begin, end = offsets[row, tokens, 0], offsets[row, tokens, 1]
        spaces = np.fromiter((m.start() for m in _WHITESPACE.finditer(text)), np.int64)
        # A token starts a word when whitespace lies between the previous token's end and its start.
        gap = np.searchsorted(spaces, begin[1:]) - np.searchsorted(spaces, end[:-1])
        starts[row, tokens] = np.concatenate([[1], gap > 0])
    return starts


def mask_whole_words(draws: jax.Array, random_ids: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
                     word_start: jax.Array, config: MaskingConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """PMC-CLIP's `base_masker` on token ids, given its random draws: `draws[b, k]` is the `random.random()` of
    row b's k-th word and `random_ids[b, k]` the token a random replacement puts in its place.

    -> (masked input_ids, their attention mask, targets): targets are the positions whose label (the original
    input_ids, unmoved) the loss reads: the selected words' tokens, [CLS] and [SEP].
    """
    batch, length = input_ids.shape
    special = jnp.isin(input_ids, jnp.asarray(config.special_ids, input_ids.dtype))
    real = attention_mask > 0
    eligible = real & ~special
    starts = (word_start > 0) & eligible
    word = jnp.maximum(jnp.cumsum(starts, axis=1) - 1, 0)  # the word each token belongs to
    draw = jnp.take_along_axis(draws, word, axis=1)
    selected = eligible & (draw < config.probability)
    action = draw / config.probability  # base_masker: prob /= ratio, then 80% mask / 10% random / 10% keep
    to_mask = selected & (action < 0.8)
    to_random = selected & (action >= 0.8) & (action < 0.9)
    masked = jnp.where(to_mask, config.mask_token_id, input_ids)
    masked = jnp.where(to_random, jnp.take_along_axis(random_ids, word, axis=1).astype(input_ids.dtype), masked)
    # A randomly replaced word keeps one position (its first); the rest of the row moves left over the others.
    keep = ~(to_random & ~starts)
    position = jnp.where(keep, jnp.cumsum(keep, axis=1) - 1, length)  # dropped positions fall off the end
    rows = jnp.arange(batch)[:, None]
    out_ids = jnp.full_like(input_ids, config.pad_token_id).at[rows, position].set(masked, mode="drop")
    out_mask = jnp.zeros_like(attention_mask).at[rows, position].set(attention_mask, mode="drop")
    targets = selected | (real & special & (input_ids != config.pad_token_id))
    return out_ids, out_mask, targets


def mask_batch(rng: jax.Array, input_ids: jax.Array, attention_mask: jax.Array, word_start: jax.Array | None,
               config: MaskingConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The configured rule -> (masked input_ids, attention mask, targets of the MLM loss)."""
    if not config.whole_word:
        masked, selected = mask_tokens(rng, input_ids, attention_mask, config)
        return masked, attention_mask, selected
    if word_start is None:
        raise ValueError("whole-word masking needs the batch's word_start (medclip.training.mlm.word_starts)")
    draw_rng, token_rng = jax.random.split(rng)
    replacements = jnp.asarray(config.replacement_ids())
    random_ids = replacements[jax.random.randint(token_rng, input_ids.shape, 0, len(replacements))]
    return mask_whole_words(jax.random.uniform(draw_rng, input_ids.shape), random_ids, input_ids, attention_mask,
                            word_start, config)


def mlm_loss_and_accuracy(logits: jax.Array, labels: jax.Array, selected: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits (batch, length, vocab), labels (batch, length) = the unmasked input_ids, selected (batch, length):
    the targets -> (mean cross-entropy, accuracy) over them (PMC-CLIP's nll_loss mean over the labels it does
    not ignore); both 0 when there is none."""
    weights = selected.astype(jnp.float32)
    count = jnp.maximum(weights.sum(), 1.0)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return (losses * weights).sum() / count, (correct * weights).sum() / count
