"""eval_loss is the configured training loss: the trainer's eval loss (from the eval embeddings and the
temperature/bias parameters) equals the training step's loss on the model output for the same batch."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medclip import FlaxHybridCLIP, HybridCLIPConfig
from medclip.training import losses
from medclip.training.losses import LossConfig
from medclip.training.step import make_eval_loss


@pytest.fixture(scope="module")
def model_and_batch():
    config = dataclasses.replace(HybridCLIPConfig.tiny(), logit_bias_init_value=-3.0)
    model = FlaxHybridCLIP(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    batch = {"input_ids": jnp.asarray(rng.integers(2, 90, size=(8, 8)), jnp.int32),
             "attention_mask": jnp.ones((8, 8), jnp.int32),
             "pixel_values": jnp.asarray(rng.normal(size=(8, 32, 32, 3)), jnp.float32)}
    # The concept loss's fields: examples 0/5 share a caption, 1/2 a concept set, 3/4 overlap.
    fields = {"concept_ids": np.array([[0, -1], [1, 2], [2, 1], [3, 4], [4, 5], [6, -1], [-1, -1], [7, -1]],
                                      np.int32),
              "caption_group": np.array([0, 1, 2, 3, 4, 0, 5, 6], np.int32)}
    return model, batch, fields


@pytest.mark.parametrize("config", [LossConfig(name="clip"), LossConfig(name="sigmoid"),
                                    LossConfig(name="hybrid", hybrid_alpha=0.3, hybrid_temperature=0.5),
                                    LossConfig(name="hybrid", hybrid_alpha=0.3, hybrid_form="report"),
                                    LossConfig(name="concept", concept_target_weight=0.4),
                                    LossConfig(name="concept", false_negatives="mask")])
def test_eval_loss_is_the_training_loss(model_and_batch, config):
    model, batch, fields = model_and_batch
    out = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
    trained = losses.LossParams(logit_scale=model.temperature_scale())  # what the step passes
    training = float(losses.compute_loss(out, config, fields, trained))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    image, text = np.asarray(out.image_embeds), np.asarray(out.text_embeds)
    evaluated = make_eval_loss(config)(image, text, params, 8, fields)
    np.testing.assert_allclose(evaluated, training, rtol=1e-6)
    # In batches of 4 pairs: the mean of the loss of each half (the fields cut alike).
    halves = [float(losses.compute_loss(model(batch["input_ids"][s], batch["pixel_values"][s],
                                              batch["attention_mask"][s]), config,
                                        {k: v[s] for k, v in fields.items()}, trained))
              for s in (slice(0, 4), slice(4, 8))]
    np.testing.assert_allclose(make_eval_loss(config)(image, text, params, 4, fields), np.mean(halves), rtol=1e-5)


def test_the_losses_differ_so_the_test_above_can_fail(model_and_batch):
    model, batch, fields = model_and_batch
    out = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
    values = {name: float(losses.compute_loss(out, LossConfig(name=name), fields)) for name in losses.LOSSES}
    assert len({round(v, 4) for v in values.values()}) == len(losses.LOSSES) == 4, values


def test_unknown_loss_is_named():
    with pytest.raises(ValueError, match="'focal'.*clip, hybrid, sigmoid, concept"):
        losses.compute_loss(None, LossConfig(name="focal"))
