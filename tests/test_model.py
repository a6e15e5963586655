"""FlaxHybridCLIP behaviour that does not need PyTorch: configs, options and input checks."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medclip import FlaxHybridCLIP, HybridCLIPConfig
from medclip.models import BertConfig, CLIPTextConfig, CLIPVisionConfig


def _batch(config: HybridCLIPConfig, batch: int = 4):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 90, size=(batch, 10))
    ids[:, -1] = config.text_config.eos_token_id if isinstance(config.text_config, CLIPTextConfig) else 5
    size = config.vision_config.image_size
    return jnp.asarray(ids), jnp.ones_like(jnp.asarray(ids)), jnp.asarray(rng.normal(size=(batch, size, size, 3)),
                                                                          jnp.float32)


@pytest.mark.parametrize("text_type", ["bert", "roberta", "distilbert", "clip_text_model"])
def test_config_json_round_trip(tmp_path, text_type):
    config = HybridCLIPConfig.tiny(text_type)
    config.to_json_file(tmp_path / "config.json")
    data = json.loads((tmp_path / "config.json").read_text())
    # Two CLIP towers with CLIP's heads are a transformers CLIPModel; anything else a dual encoder.
    assert data["model_type"] == ("clip" if text_type == "clip_text_model" else "vision-text-dual-encoder")
    assert {"vision_config", "text_config", "projection_dim", "logit_scale_init_value"} <= set(data)
    assert HybridCLIPConfig.from_json_file(tmp_path / "config.json") == config


def test_distilbert_config_uses_its_own_field_names():
    data = BertConfig.tiny("distilbert").to_hf_dict()
    assert data["dim"] == 32 and data["n_layers"] == 2 and "hidden_size" not in data
    assert BertConfig.from_hf_dict(data) == BertConfig.tiny("distilbert")


def test_outputs_shapes_and_normalisation():
    config = HybridCLIPConfig.tiny()
    model = FlaxHybridCLIP(config, rngs=nnx.Rngs(0))
    ids, mask, px = _batch(config)
    out = model(ids, px, mask)
    assert out.logits_per_image.shape == (4, 4) and out.logits_per_text.shape == (4, 4)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out.image_embeds), axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out.logits_per_image), np.asarray(out.logits_per_text).T)
    expected = np.asarray(out.image_embeds) @ np.asarray(out.text_embeds).T * math.exp(config.logit_scale_init_value)
    np.testing.assert_allclose(np.asarray(out.logits_per_image), expected, rtol=1e-5, atol=1e-5)


def test_logit_scale_is_clamped_at_100_and_bias_is_added():
    config = HybridCLIPConfig.tiny().__class__(**{**HybridCLIPConfig.tiny().__dict__, "logit_bias_init_value": -10.0})
    model = FlaxHybridCLIP(config, rngs=nnx.Rngs(0))
    model.logit_scale[...] = jnp.asarray(10.0)  # exp(10) >> 100
    ids, mask, px = _batch(config)
    out = model(ids, px, mask)
    expected = np.asarray(out.text_embeds) @ np.asarray(out.image_embeds).T * 100.0 - 10.0
    np.testing.assert_allclose(np.asarray(out.logits_per_text), expected, rtol=1e-5, atol=1e-4)


def test_the_two_encoders_and_logits_are_the_model_and_a_cached_tower_needs_only_the_head():
    """encode_image / encode_text / logits give __call__'s output; the heads on the towers' pooled outputs (what a
    locked-tower cache holds) give the encoders' features, with the same dropout keys."""
    from medclip.models.hybrid import l2_normalize, tower_keys

    config = HybridCLIPConfig.tiny().replace(logit_bias_init_value=-2.0)
    model = FlaxHybridCLIP(config, rngs=nnx.Rngs(0))
    ids, mask, px = _batch(config)
    out = model(ids, px, mask)
    images, texts = l2_normalize(model.encode_image(px)), l2_normalize(model.encode_text(ids, mask))
    np.testing.assert_allclose(np.asarray(model.logits(images, texts)), np.asarray(out.logits_per_text), atol=1e-6)
    np.testing.assert_allclose(np.asarray(model.get_image_features(px)), np.asarray(model.encode_image(px)))
    image_keys, text_keys = tower_keys(None, jax.random.PRNGKey(3))
    np.testing.assert_array_equal(np.asarray(model.project_image(model.pool_image(px), **image_keys)),
                                  np.asarray(model.encode_image(px, **image_keys)))
    _, pooled = model.pool_text(ids, mask)
    np.testing.assert_array_equal(np.asarray(model.project_text(pooled, **text_keys)),
                                  np.asarray(model.encode_text(ids, mask, **text_keys)))
    with pytest.raises(ValueError, match="fusion module"):
        model.fusion_logits(pooled[:, None], images, mask)


def test_remat_gives_same_values_and_gradients():
    config = HybridCLIPConfig.tiny()
    plain = FlaxHybridCLIP(config, rngs=nnx.Rngs(0))
    remat = FlaxHybridCLIP(config, remat=True, rngs=nnx.Rngs(0))
    ids, mask, px = _batch(config)

    def loss(model):
        return jnp.mean(model(ids, px, mask).logits_per_image ** 2)

    grads_plain = nnx.grad(loss)(plain)
    grads_remat = nnx.grad(loss)(remat)
    for a, b in zip(jax.tree.leaves(grads_plain), jax.tree.leaves(grads_remat)):  # atol: 1e-6 of the leaf's scale
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                   atol=1e-6 * max(1.0, float(np.abs(np.asarray(b)).max())))


def test_bf16_compute_keeps_fp32_params_and_close_outputs():
    config = HybridCLIPConfig.tiny()
    fp32 = FlaxHybridCLIP(config, rngs=nnx.Rngs(0))
    bf16 = FlaxHybridCLIP(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    ids, mask, px = _batch(config)
    out32, out16 = fp32(ids, px, mask), bf16(ids, px, mask)
    assert out16.image_embeds.dtype == jnp.float32  # normalised in fp32
    np.testing.assert_allclose(np.asarray(out16.image_embeds), np.asarray(out32.image_embeds), atol=3e-2)


def test_dropout_only_with_a_key():
    config = HybridCLIPConfig.tiny()
    model = FlaxHybridCLIP(config, rngs=nnx.Rngs(0))
    ids, mask, _ = _batch(config)
    a = model.get_text_features(ids, mask)
    b = model.get_text_features(ids, mask)
    c = model.get_text_features(ids, mask, dropout_rng=jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))


def test_nchw_pixels_get_a_clear_error():
    config = HybridCLIPConfig.tiny()
    model = FlaxHybridCLIP(config, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="NHWC"):
        model.get_image_features(jnp.zeros((2, 3, 32, 32)))


def test_too_long_text_gets_a_clear_error():
    model = FlaxHybridCLIP(HybridCLIPConfig.tiny(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="at most 40"):
        model.get_text_features(jnp.ones((1, 41), jnp.int32))


def test_unsupported_configs_fail_early():
    with pytest.raises(ValueError, match="position_embedding_type"):
        BertConfig(position_embedding_type="relative_key")
    with pytest.raises(ValueError, match="activation"):
        FlaxHybridCLIP(HybridCLIPConfig(vision_config=CLIPVisionConfig.tiny().replace(hidden_act="mish"),
                                        text_config=BertConfig.tiny(), projection_dim=8))
    with pytest.raises(ValueError, match="not a dual-encoder config"):
        HybridCLIPConfig.from_dict({"model_type": "bert"})
