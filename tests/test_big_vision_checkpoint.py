"""big_vision's SigLIP `.npz` checkpoints (two_towers: params/img/..., params/txt/..., t, b) load here with the
embeddings and logits big_vision's own model computed (tests/golden/make_big_vision.py ran its code on a tiny
random SigLIP with a non-default t and b), from python-loop and scanned encoder checkpoints alike; what we save
from one loads in transformers' SiglipModel with the same logits; options SigLIP does not compute are refused by
name, and a parameter we would not read is an error."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from medclip import FlaxHybridCLIP
from medclip.checkpoints.conversion import WeightMismatchError
from medclip.checkpoints.readers import read_npz
from medclip.models.tower_contract import UnsupportedOptionError

GOLDEN = Path(__file__).resolve().parent / "golden" / "big_vision_siglip"
TOLERANCE = 1e-4


def _io():
    return dict(np.load(GOLDEN / "io.npz"))


def _ours(model, io):
    out = model(jnp.asarray(io["input_ids"]), jnp.asarray(io["pixel_values"]))
    return np.asarray(out.image_embeds), np.asarray(out.text_embeds), np.asarray(out.logits_per_image)


@pytest.mark.parametrize("name,prefix", [("siglip_tiny.npz", ""), ("siglip_tiny_scan.npz", "scan_")])
def test_big_vision_npz_gives_big_vision_outputs(name, prefix):
    io = _io()
    model = FlaxHybridCLIP.from_pretrained(GOLDEN / name)
    image, text, logits = _ours(model, io)
    np.testing.assert_allclose(image, io[prefix + "image_embeds"], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(text, io[prefix + "text_embeds"], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(logits, io[prefix + "logits"], atol=TOLERANCE, rtol=0)
    assert np.ptp(io[prefix + "logits"]) > 0.5  # the pairs differ: not a bias-only degenerate case
    config = model.config
    assert config.siglip_type == "siglip" and not config.clamp_logit_scale
    assert float(model.temperature_scale()) == pytest.approx(7.3, rel=1e-6)  # exp(t)
    assert float(model.logit_bias[...]) == pytest.approx(-4.7, rel=1e-6)
    assert config.vision_config.num_attention_heads == 2 and config.vision_config.image_size == 32
    assert config.text_config.max_position_embeddings == 16 and config.text_config.pad_token_id == 1
    assert config.image_preprocess.mean == (0.5,) * 3 and config.image_preprocess.resize_mode == "squash"
    assert not config.text_preprocess.mask_padding and config.text_preprocess.padding == "max_length"


def test_saved_as_a_siglip_model_that_transformers_loads(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    io = _io()
    model = FlaxHybridCLIP.from_pretrained(GOLDEN / "siglip_tiny.npz")
    model.save_pretrained(tmp_path)
    theirs = transformers.SiglipModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        out = theirs(input_ids=torch.from_numpy(io["input_ids"].astype(np.int64)),
                     pixel_values=torch.from_numpy(io["pixel_values"].transpose(0, 3, 1, 2).copy()))
    np.testing.assert_allclose(out.logits_per_image.numpy(), io["logits"], atol=TOLERANCE, rtol=0)


def _edited(tmp_path, drop=(), add=None):
    tensors = dict(np.load(GOLDEN / "siglip_tiny.npz"))
    tensors = {k: v for k, v in tensors.items() if not k.startswith(tuple(drop))}
    tensors.update(add or {})
    path = tmp_path / "edited.npz"
    np.savez(path, **tensors)
    return path


@pytest.mark.parametrize("drop,add,message", [
    (("params/img/pos_embedding",), None, "posemb sincos2d"),
    (("params/img/MAPHead_0/",), None, "without the MAP head"),
    ((), {"params/img/head/kernel": np.zeros((32, 8), np.float32)}, "an image head"),
    ((), {"params/img/cls": np.zeros((1, 1, 32), np.float32)}, "pool_type tok"),
    ((), {"params/txt/MAPHead_0/probe": np.zeros((1, 1, 32), np.float32)}, "MAP-pooled text tower"),
    (("params/b",), None, "no bias b"),
])
def test_unsupported_big_vision_options_are_refused_by_name(tmp_path, drop, add, message):
    with pytest.raises(UnsupportedOptionError, match=message):
        FlaxHybridCLIP.from_pretrained(_edited(tmp_path, drop, add))


def test_a_parameter_we_would_not_read_is_an_error(tmp_path):
    extra = {"params/img/Transformer/encoderblock_0/extra/kernel": np.zeros((2, 2), np.float32)}
    with pytest.raises(WeightMismatchError, match="does not use.*encoderblock_0/extra/kernel"):
        FlaxHybridCLIP.from_pretrained(_edited(tmp_path, add=extra))
    with pytest.raises(WeightMismatchError, match="MlpBlock_0/Dense_1/bias is missing"):
        FlaxHybridCLIP.from_pretrained(_edited(tmp_path, drop=("params/txt/Encoder_0/encoderblock_1/MlpBlock_0/"
                                                               "Dense_1/bias",)))


def test_bfloat16_npz_arrays_come_back_as_bfloat16(tmp_path):
    tensors = dict(np.load(GOLDEN / "siglip_tiny.npz"))
    half = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    np.savez(tmp_path / "bf16.npz", **half)  # NumPy stores them as 2-byte void, as big_vision's bf16 checkpoints
    read = read_npz(tmp_path / "bf16.npz")
    key = "params/txt/head/kernel"
    assert read[key].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(read[key].astype(np.float32), half[key].astype(np.float32))
    io = _io()
    logits = _ours(FlaxHybridCLIP.from_pretrained(tmp_path / "bf16.npz"), io)[2]
    np.testing.assert_allclose(logits, io["logits"], atol=0.1, rtol=0)  # bf16 weights: ~3 significant digits
