"""SigLIP and fixed-resolution SigLIP 2 against transformers' SiglipModel / Siglip2Model, both directions: their
folder loaded here gives their logits, and our save loads in transformers with equal logits. Tiny random fp32
weights with a logit scale above CLIP's clamp (exp 4.9 = 134) and a non-default bias, so neither can hide."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from medclip import FlaxHybridCLIP
from medclip.models.tower_contract import UnsupportedOptionError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.hf_fixtures import randomize

TOWER = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4}
LOGIT_SCALE, LOGIT_BIAS = 4.9, -7.3
TOLERANCE = 1e-4


def siglip_config(version: int = 1, **vision):
    text = dict(vocab_size=99, max_position_embeddings=16, **TOWER)
    if version == 1:
        return transformers.SiglipConfig(text_config=text, vision_config=dict(image_size=32, patch_size=8, **TOWER,
                                                                              **vision))
    return transformers.Siglip2Config(text_config=text, vision_config=dict(num_patches=16, patch_size=8, **TOWER,
                                                                           **vision))


def make_model(version: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    config = siglip_config(version)
    model = (transformers.SiglipModel if version == 1 else transformers.Siglip2Model)(config).eval()
    randomize(model, seed)
    with torch.no_grad():
        model.logit_scale.fill_(LOGIT_SCALE)
        model.logit_bias.fill_(LOGIT_BIAS)
    return model


def inputs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token ids padded to the full 16 positions (pad id 1), as SigLIP's tokenizer gives them; NHWC images."""
    rng = np.random.default_rng(seed)
    ids = np.ones((3, 16), np.int64)
    for row, length in enumerate((16, 9, 4)):
        ids[row, :length] = rng.integers(3, 99, length)
    return ids, rng.standard_normal((2, 32, 32, 3)).astype(np.float32)


def their_logits(model, ids: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    nchw = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        if isinstance(model, transformers.Siglip2Model):
            grid, p = 4, 8  # Siglip2 takes flattened (row, column, channel) patches and the patch grid
            patches = nchw.reshape(2, 3, grid, p, grid, p).permute(0, 2, 4, 3, 5, 1).reshape(2, grid * grid, -1)
            out = model(input_ids=torch.from_numpy(ids), pixel_values=patches,
                        pixel_attention_mask=torch.ones(2, grid * grid, dtype=torch.long),
                        spatial_shapes=torch.tensor([[grid, grid]] * 2))
        else:
            out = model(input_ids=torch.from_numpy(ids), pixel_values=nchw)
    return out.logits_per_text.numpy()


def our_logits(model, ids: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    return np.asarray(model(jnp.asarray(ids), jnp.asarray(pixels)).logits_per_text)


@pytest.mark.parametrize("version", [1, 2])
def test_theirs_loads_here_with_their_logits(tmp_path, version):
    theirs = make_model(version)
    theirs.save_pretrained(tmp_path)
    ours = FlaxHybridCLIP.from_pretrained(tmp_path)
    ids, pixels = inputs()
    expected = their_logits(theirs, ids, pixels)
    assert np.abs(expected).max() > 1.0  # the scale and bias are in play, not a degenerate zero
    np.testing.assert_allclose(our_logits(ours, ids, pixels), expected, atol=TOLERANCE, rtol=0)
    assert ours.config.siglip_type == ("siglip" if version == 1 else "siglip2")
    assert ours.config.context_length == 16 and not ours.config.text_preprocess.mask_padding
    assert ours.config.text_preprocess.padding == "max_length"
    assert ours.config.image_preprocess.mean == (0.5,) * 3 and ours.config.image_preprocess.resize_mode == "squash"
    assert float(ours.temperature_scale()) == pytest.approx(np.exp(LOGIT_SCALE), rel=1e-6)  # not clamped at 100


@pytest.mark.parametrize("version", [1, 2])
def test_our_save_loads_in_transformers_with_equal_logits(tmp_path, version):
    theirs = make_model(version, seed=1)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = FlaxHybridCLIP.from_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["model_type"] == ("siglip" if version == 1 else "siglip2")
    cls = transformers.SiglipModel if version == 1 else transformers.Siglip2Model
    reloaded = cls.from_pretrained(tmp_path / "ours").eval()
    ids, pixels = inputs(seed=2)
    np.testing.assert_allclose(their_logits(reloaded, ids, pixels), our_logits(ours, ids, pixels), atol=TOLERANCE,
                               rtol=0)
    # and back: what we wrote reads as the same model
    again = FlaxHybridCLIP.from_pretrained(tmp_path / "ours")
    assert again.config == ours.config
    np.testing.assert_array_equal(our_logits(again, ids, pixels), our_logits(ours, ids, pixels))


def test_siglip2_other_resolutions_are_refused_by_name(tmp_path):
    make_model(2).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["vision_config"]["num_patches"] = 20
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedOptionError, match="num_patches 20 is not a square grid"):
        FlaxHybridCLIP.from_pretrained(tmp_path)


def test_clip_models_still_clamp_their_logit_scale():
    from medclip.models.hybrid import LOGIT_SCALE_MAX, HybridCLIPConfig, logit_temperature

    config = HybridCLIPConfig.tiny("clip_text_model")
    assert config.clamp_logit_scale and "clamp_logit_scale" not in config.to_dict()["medclip"]
    assert float(logit_temperature(jnp.asarray(LOGIT_SCALE), config.clamp_logit_scale)) == LOGIT_SCALE_MAX
    unclamped = config.replace(clamp_logit_scale=False)
    assert float(logit_temperature(jnp.asarray(LOGIT_SCALE), False)) == pytest.approx(np.exp(LOGIT_SCALE), rel=1e-6)
    assert HybridCLIPConfig.from_dict(unclamped.to_dict()) == unclamped


def test_eval_loss_rebuilds_siglip_logits_unclamped():
    from medclip.models.hybrid import HybridCLIPConfig
    from medclip.training.step import embeddings_output

    config = HybridCLIPConfig.from_dict(siglip_config(1).to_dict()).replace(logit_scale_init_value=LOGIT_SCALE,
                                                                             logit_bias_init_value=LOGIT_BIAS)
    model = FlaxHybridCLIP(config)
    ids, pixels = inputs()
    out = model(jnp.asarray(ids), jnp.asarray(pixels))
    rebuilt = embeddings_output(out.image_embeds, out.text_embeds, model.logit_scale[...], model.logit_bias[...],
                                clamp=config.clamp_logit_scale)
    np.testing.assert_allclose(rebuilt.logits_per_text, out.logits_per_text, rtol=1e-6, atol=1e-6)
    clamped = embeddings_output(out.image_embeds, out.text_embeds, model.logit_scale[...], model.logit_bias[...])
    assert not np.allclose(clamped.logits_per_text, out.logits_per_text)


def test_siglip_towers_pair_from_their_folders(tmp_path):
    """`from_text_vision_pretrained` takes each tower out of a whole SiglipModel folder (the text model's `head`
    is the projection, not the tower's, so it is skipped like any tower's head)."""
    theirs = make_model(1, seed=4)
    theirs.save_pretrained(tmp_path)
    paired = FlaxHybridCLIP.from_text_vision_pretrained(tmp_path, tmp_path, projection_dim=32)
    ids, pixels = inputs()
    nchw = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        pooled = theirs.vision_model(pixel_values=nchw).pooler_output.numpy()
    _, ours = paired.vision_model(jnp.asarray(pixels))
    np.testing.assert_allclose(np.asarray(ours), pooled, atol=TOLERANCE, rtol=0)
    with torch.no_grad():
        hidden = theirs.text_model(input_ids=torch.from_numpy(ids)).last_hidden_state[:, -1].numpy()
    _, text = paired.text_model(jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(text), hidden, atol=TOLERANCE, rtol=0)


def test_an_open_clip_siglip_folder_is_refused_by_name(tmp_path):
    """open_clip's ViT-SO400M-14-SigLIP-384 config: a timm trunk with MAP pooling, text pooled at the last token."""
    from medclip.checkpoints.openclip import OpenCLIPConfigError

    model_cfg = {"embed_dim": 1152, "init_logit_bias": -10, "custom_text": True,
                 "vision_cfg": {"image_size": 384, "timm_model_name": "vit_so400m_patch14_siglip_384",
                                "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"},
                 "text_cfg": {"context_length": 64, "vocab_size": 32000, "width": 1152, "heads": 16, "layers": 27,
                              "mlp_ratio": 3.7362, "no_causal_mask": True, "proj_bias": True, "pool_type": "last",
                              "norm_kwargs": {"eps": 1e-6}}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    from safetensors.numpy import save_file

    save_file({"logit_bias": np.zeros((1,), np.float32)}, str(tmp_path / "open_clip_model.safetensors"))
    with pytest.raises(OpenCLIPConfigError, match="OpenCLIP SigLIP model .* load its transformers SiglipModel"):
        FlaxHybridCLIP.from_pretrained(tmp_path)
