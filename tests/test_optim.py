"""Optimizer masks, schedules and tower freezing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from medclip import FlaxHybridCLIP, HybridCLIPConfig
from medclip.training.optim import OptimizerConfig, decay_mask, make_optimizer, make_schedule, tower_labels


def _params():
    return nnx.to_pure_dict(nnx.state(FlaxHybridCLIP(HybridCLIPConfig.tiny(), rngs=nnx.Rngs(0)), nnx.Param))


def _flat(tree):
    return {".".join(str(getattr(k, "key", k)) for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_no_decay_on_biases_norms_embeddings_and_temperature():
    mask = _flat(decay_mask(_params()))
    assert mask["text_model.encoder.layers.0.self_attn.q_proj.kernel"]
    assert mask["visual_projection.kernel"]
    assert mask["vision_model.embeddings.patch_embedding"]  # a projection matrix, decayed as in CLIP
    for key in ("text_model.encoder.layers.0.self_attn.q_proj.bias", "text_model.encoder.layers.0.attention_norm.scale",
                "vision_model.encoder.layers.1.layer_norm2.bias", "text_model.embeddings.word_embeddings.embedding",
                "vision_model.embeddings.position_embedding.embedding", "vision_model.embeddings.class_embedding",
                "logit_scale", "vision_model.pre_layernorm.scale", "vision_model.post_layernorm.bias",
                "text_model.embeddings.layer_norm.scale"):
        assert not mask[key], key


def test_linear_schedule_warms_up_then_decays_to_zero():
    schedule = make_schedule(1.0, OptimizerConfig(warmup_steps=10, total_steps=110, schedule="linear"))
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == 1.0
    assert abs(float(schedule(60)) - 0.5) < 1e-6
    assert float(schedule(110)) == 0.0


def test_cosine_schedule_ends_at_zero():
    schedule = make_schedule(2.0, OptimizerConfig(warmup_steps=0, total_steps=100, schedule="cosine"))
    assert float(schedule(0)) == 2.0 and abs(float(schedule(100))) < 1e-6


def test_frozen_tower_does_not_move_and_per_tower_rates_apply():
    params = _params()
    config = OptimizerConfig(learning_rate=1e-2, total_steps=10, freeze_vision=True, text_learning_rate=1e-3,
                             weight_decay=0.0, max_grad_norm=None)
    tx, _ = make_optimizer(params, config)
    labels = _flat(tower_labels(params, config))
    assert labels["vision_model.pre_layernorm.scale"] == "frozen" and labels["logit_scale"] == "head"
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    flat = _flat(updates)
    assert all(float(jnp.abs(v).max()) == 0 for k, v in flat.items() if k.startswith("vision_model"))
    # Adam's first step moves each parameter by about the learning rate (ignoring warmup: none here).
    text_step = float(jnp.abs(flat["text_model.pooler.kernel"]).max())
    head_step = float(jnp.abs(flat["text_projection.kernel"]).max())
    np.testing.assert_allclose([text_step, head_step], [1e-3, 1e-2], rtol=1e-3)


def test_gradient_accumulation_applies_every_k_steps():
    params = {"w": jnp.ones(3)}
    tx, _ = make_optimizer(params, OptimizerConfig(learning_rate=0.1, total_steps=10, schedule="constant",
                                                   gradient_accumulation_steps=2, weight_decay=0.0))
    state = tx.init(params)
    updates, state = tx.update({"w": jnp.ones(3)}, state, params)
    assert float(jnp.abs(updates["w"]).max()) == 0.0
    updates, state = tx.update({"w": jnp.ones(3)}, state, params)
    assert float(jnp.abs(updates["w"]).max()) > 0.0
    assert isinstance(tx, optax.GradientTransformation) or hasattr(tx, "update")
