"""Locked-tower caching for the image side: a frozen image tower fed the same pixels computes the same pooled
output, so when training images are not augmented (`--train_crop center`, no flips) it is computed once per
training image before training; the step then runs only the trainable parts and the pipeline decodes no images.

Exact by construction, as the text cache (medclip.training.text_cache): the same function of the same frozen
weights and the same pixels (`decoded_eval_images` decodes them with the function the training pipeline uses for
`--train_crop center`), evaluated once instead of every step; tests/test_image_cache.py checks the loss,
gradients and parameters, also on 8 devices and across a kill-and-resume. The condition is checked, not assumed:
the tower must be frozen, fed deterministic pixels, run no dropout, and normalise with fixed BatchNorm statistics
(a train-mode BatchNorm normalises each batch by its own statistics, so its output depends on the batch).
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from medclip.data.fields import ImageFeatures
from medclip.data.pipeline import decoded_eval_images
from medclip.data.records import Record

logger = logging.getLogger(__name__)


def why_not_cacheable(model: nnx.Module, *, freeze_vision: bool, train_crop: str, hflip: bool, dropout: bool,
                      freeze_bn_stats: bool) -> str | None:
    """None when the image tower's pooled output can be cached; otherwise the reason, for the log or the error."""
    if not freeze_vision:
        return "the image tower trains (no --freeze_vision)"
    if train_crop != "center":
        return "training images are cropped at random (pass --train_crop center)"
    if hflip:
        return "training images are flipped at random (--hflip)"
    if dropout and model.config.vision_config.stochastic:
        return ("the frozen image tower still runs dropout or drop path (pass --no_text_dropout, which turns the "
                "towers' off)")
    if not freeze_bn_stats and jax.tree.leaves(nnx.state(model.vision_model, nnx.BatchStat)):
        return "its BatchNorm normalises each batch by the batch's statistics (pass --freeze_bn_stats)"
    return None


def pooled_image_features(model: nnx.Module, items: list[Record], *, image_size: int, preprocess: Any,
                          batch_size: int = 64, threads: int | None = None,
                          progress: bool = True) -> ImageFeatures:
    """The image tower's pooled output (before the head) for every record, in eval mode (BatchNorm's running
    statistics, as the step with --freeze_bn_stats), in fixed-size jitted chunks (one compilation). Records whose
    image does not decode get `valid` False."""
    graphdef, state = nnx.split(model.vision_model)

    @jax.jit
    def pooled(state, pixels):
        _, out = nnx.merge(graphdef, state)(pixels, pooled_only=True, train=False)
        return out.astype(jnp.float32)

    features = np.zeros((len(items), model.config.vision_config.hidden_size), np.float32)
    valid = np.zeros(len(items), bool)
    bar = tqdm(total=len(items), desc="caching the locked image tower", unit="image", disable=not progress)
    for indices, pixels in decoded_eval_images(items, image_size=image_size, batch_size=batch_size,
                                               preprocess=preprocess, threads=threads):
        real = len(indices)
        if real < batch_size:  # pad to the compiled shape
            pixels = np.concatenate([pixels, np.repeat(pixels[-1:], batch_size - real, axis=0)])
        features[indices] = np.asarray(pooled(state, pixels))[:real]
        valid[indices] = True
        bar.update(real)
    bar.close()
    return ImageFeatures(features, valid)
