"""Work skipping that must not change results: text packing (real tokens only) and the pooled-only last
layer give the same outputs and gradients as the padded, every-token computation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medclip import FlaxHybridCLIP, HybridCLIPConfig
from medclip.models import CLIPTextConfig
from medclip.models.packing import PackingPlan, make_packing, plan_packing
from medclip.training.optim import OptimizerConfig, make_optimizer
from medclip.training.step import StepConfig, init_state, make_train_step
from tests.sharded_step_check import has_zero_gradient

TEXT_TYPES = ["bert", "roberta", "distilbert", "clip_text_model"]
LENGTHS = [12, 7, 4, 9]  # real tokens per caption, of 12


def _text(config: HybridCLIPConfig) -> tuple[jax.Array, jax.Array]:
    ids = np.random.default_rng(0).integers(3, 90, size=(len(LENGTHS), 12)).astype(np.int32)
    mask = (np.arange(12)[None] < np.array(LENGTHS)[:, None]).astype(np.int32)
    if isinstance(config.text_config, CLIPTextConfig):  # CLIP pools at the end-of-text token
        ids[np.arange(len(LENGTHS)), np.array(LENGTHS) - 1] = config.text_config.eos_token_id
    return jnp.asarray(ids), jnp.asarray(mask)


def test_plan_rounds_the_fullest_group_up_to_a_size():
    mask = (np.arange(12)[None] < np.array(LENGTHS)[:, None]).astype(np.int32)  # 32 real of 48
    assert plan_packing(mask, groups=1, sizes=8) == PackingPlan(1, 36)  # sizes of 6 tokens
    assert plan_packing(mask, groups=2, sizes=8) == PackingPlan(2, 21)  # groups hold 19 and 13 of 24
    assert plan_packing(mask, groups=1, sizes=2) is None  # 32 rounds up to the whole 48: nothing saved
    assert plan_packing(mask, groups=1, sizes=0) is None  # off
    assert plan_packing(np.ones((4, 12)), groups=1) is None
    assert plan_packing(np.zeros((4, 12)), groups=1) == PackingPlan(1, 6)  # never an empty buffer
    assert plan_packing(mask, groups=3) is None  # rows do not split into the groups: padded layout


def test_pack_and_unpack_round_trip_real_tokens():
    _, mask = _text(HybridCLIPConfig.tiny())
    packing = make_packing(mask, PackingPlan(2, 21))
    x = jnp.arange(4 * 12, dtype=jnp.float32).reshape(4, 12, 1) + 1
    packed = packing.pack(x)
    assert packed.shape == (2, 21, 1)
    assert np.count_nonzero(packed) == sum(LENGTHS)  # each real token once, zeros after
    np.testing.assert_array_equal(packing.unpack(packed), x * mask[..., None])
    np.testing.assert_array_equal(packing.take(packed, jnp.array([11, 0, 3, 8]))[:, 0, 0], [12, 13, 28, 45])
    with pytest.raises(ValueError, match="attention_mask"):
        make_packing(None, PackingPlan(1, 36))


@pytest.mark.parametrize("text_type", TEXT_TYPES)
@pytest.mark.parametrize("groups", [1, 2])
def test_packed_text_tower_matches_padded(text_type, groups):
    model = FlaxHybridCLIP(HybridCLIPConfig.tiny(text_type), rngs=nnx.Rngs(1))
    ids, mask = _text(model.config)
    plan = plan_packing(np.asarray(mask), groups=groups)
    assert plan is not None

    def features(m, packing):
        return m.get_text_features(ids, mask, text_packing=packing)

    np.testing.assert_allclose(features(model, plan), features(model, None), atol=1e-6)
    hidden, padded_hidden = model.text_model(ids, mask, packing=plan)[0], model.text_model(ids, mask)[0]
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(hidden)[real], np.asarray(padded_hidden)[real], atol=1e-6)

    grads = [nnx.grad(lambda m, p=p: jnp.sum(features(m, p) ** 2))(model) for p in (plan, None)]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_a_plan_too_small_gives_nan_not_truncated_text():
    model = FlaxHybridCLIP(HybridCLIPConfig.tiny(), rngs=nnx.Rngs(1))
    ids, mask = _text(model.config)
    out = np.asarray(model.get_text_features(ids, mask, text_packing=PackingPlan(2, 16)))  # groups: 19, 13
    assert np.isnan(out[:2]).all() and np.isfinite(out[2:]).all()


@pytest.mark.parametrize("text_type", TEXT_TYPES)
@pytest.mark.parametrize("remat", [False, True])
def test_pooled_only_towers_match_full_towers(text_type, remat):
    model = FlaxHybridCLIP(HybridCLIPConfig.tiny(text_type), remat=remat, rngs=nnx.Rngs(1))
    ids, mask = _text(model.config)
    pixels = jnp.asarray(np.random.default_rng(1).normal(size=(4, 32, 32, 3)), jnp.float32)
    hidden, pooled = model.text_model(ids, mask, pooled_only=True)
    assert hidden is None
    np.testing.assert_allclose(pooled, model.text_model(ids, mask)[1], atol=1e-6)
    hidden, pooled = model.vision_model(pixels, pooled_only=True)
    assert hidden is None
    np.testing.assert_allclose(pooled, model.vision_model(pixels)[1], atol=1e-6)


def test_train_step_with_packing_matches_padded():
    model = FlaxHybridCLIP(HybridCLIPConfig.tiny(), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    tx, _ = make_optimizer(params, OptimizerConfig(learning_rate=1e-3, total_steps=10, schedule="constant"))
    ids, mask = _text(model.config)
    batch = {"input_ids": ids, "attention_mask": mask,
             "pixel_values": jnp.asarray(np.random.default_rng(1).normal(size=(4, 32, 32, 3)), jnp.float32)}
    results = []
    for plan in (None, plan_packing(np.asarray(mask))):
        step = jax.jit(make_train_step(graphdef, tx, StepConfig(), plan))
        state = init_state(params, tx, 0)
        losses = []
        for _ in range(3):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
        results.append((losses, state.params))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
    assert results[0][0][-1] < results[0][0][0]  # it trained
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(results[0][1]), jax.tree.leaves(results[1][1])):
        if not has_zero_gradient(path):
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=jax.tree_util.keystr(path))
