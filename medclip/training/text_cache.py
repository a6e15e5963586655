"""Locked-tower caching for the text side: a frozen text tower computes the same pooled output for a caption at
every step, so it is computed once per caption before training and the step runs only the trainable parts.

Exact by construction (the same function of the same frozen weights and the same tokens, evaluated once instead
of every step), which tests/test_text_cache.py checks on the loss, gradients and parameters after a few steps,
also on 8 devices and across a kill-and-resume. The condition is checked, not assumed: the tower must be frozen
(`--freeze_text`), deterministic (no dropout in it) and read by nothing but its pooled output (no MLM, one text
input). The image side has its own cache (medclip.training.image_cache), for un-augmented training images.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def why_not_cacheable(model_config: Any, *, freeze_text: bool, text_dropout: bool, mlm: bool) -> str | None:
    """None when the text tower's pooled output can be cached; otherwise the reason, for the log or the error."""
    if not freeze_text:
        return "the text tower trains (no --freeze_text)"
    if mlm:
        return "--mlm reads the text tower's hidden states"
    if model_config.text_inputs != 1:
        return "a two-input text head reads two pooled outputs"
    if text_dropout and model_config.text_config.stochastic:
        return "the frozen text tower still runs dropout (pass --no_text_dropout)"
    return None


def pooled_text_features(model: nnx.Module, input_ids: np.ndarray, attention_mask: np.ndarray, *,
                         batch_size: int = 256, progress: bool = True) -> np.ndarray:
    """The text tower's pooled output (before the head) for every row: (rows, hidden) float32, in fixed-size jitted
    chunks (one compilation), as the training step would compute it."""
    graphdef, state = nnx.split(model.text_model)
    pooler = model.config.text_head.pooler

    @jax.jit
    def pooled(state, ids, mask):
        _, out = nnx.merge(graphdef, state)(ids, mask, pooled_only=True, pooler=pooler)
        return out.astype(jnp.float32)

    rows = len(input_ids)
    chunks = []
    bar = tqdm(total=rows, desc="caching the locked text tower", unit="caption", disable=not progress)
    for start in range(0, rows, batch_size):
        ids, mask = input_ids[start:start + batch_size], attention_mask[start:start + batch_size]
        real = len(ids)
        if real < batch_size:  # pad to the compiled shape
            ids = np.concatenate([ids, np.repeat(ids[-1:], batch_size - real, axis=0)])
            mask = np.concatenate([mask, np.repeat(mask[-1:], batch_size - real, axis=0)])
        chunks.append(np.asarray(pooled(state, ids, mask))[:real])
        bar.update(real)
    bar.close()
    return np.concatenate(chunks) if chunks else np.zeros((0, model.config.text_config.hidden_size), np.float32)
