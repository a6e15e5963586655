"""The model zoo: whole transformers CLIPModels (openai CLIP, PubMedCLIP), both directions, and full-size
architectures built abstractly with their published parameter counts."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from medclip import FlaxHybridCLIP, HybridCLIPConfig  # noqa: E402
from medclip.models import BertConfig, CLIPTextConfig, CLIPVisionConfig, HeadConfig, TimmViTConfig  # noqa: E402
from tests import hf_fixtures as fx  # noqa: E402

ATOL = 1e-4


def _close(ours, theirs, what: str) -> None:
    ours, theirs = np.asarray(ours), theirs.detach().numpy()
    assert ours.shape == theirs.shape, what
    err = np.abs(ours - theirs).max()
    assert err < ATOL, f"{what}: max abs error {err:.2e}"


def _tiny_clip(seed: int = 9) -> transformers.CLIPModel:
    config = transformers.CLIPConfig(text_config=fx.hf_text_config("clip_text_model").to_dict(),
                                     vision_config=fx.hf_vision_config().to_dict(), projection_dim=16,
                                     logit_scale_init_value=2.0)
    clip = transformers.CLIPModel(config).eval()
    fx.randomize(clip, seed)
    return clip


def test_whole_clip_model_loads_with_its_projections_and_temperature(tmp_path):
    """openai/clip-vit-base-patch32 and PubMedCLIP are CLIPModels: towers, projections and logit_scale all load."""
    clip = _tiny_clip()
    ours = FlaxHybridCLIP.from_pretrained(fx.save(clip, tmp_path / "clip"))
    assert ours.config.is_clip and ours.config.projection_dim == 16
    ids, mask = fx.text_inputs("clip_text_model")
    px = fx.pixels()
    with torch.no_grad():
        ref = clip(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(px))
        ref_image = clip.get_image_features(pixel_values=torch.tensor(px))
        ref_text = clip.get_text_features(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    out = ours(jnp.asarray(ids), jnp.asarray(px.transpose(0, 2, 3, 1)), jnp.asarray(mask))
    _close(ours.get_image_features(jnp.asarray(px.transpose(0, 2, 3, 1))), getattr(ref_image, "pooler_output",
                                                                                     ref_image), "image features")
    _close(ours.get_text_features(jnp.asarray(ids), jnp.asarray(mask)), getattr(ref_text, "pooler_output", ref_text),
           "text features")
    _close(out.logits_per_image, ref.logits_per_image, "logits_per_image")
    _close(out.logits_per_text, ref.logits_per_text, "logits_per_text")
    assert float(ours.logit_scale[...]) == pytest.approx(float(clip.logit_scale), abs=1e-6)


def test_clip_model_saves_as_clip_model_that_transformers_loads(tmp_path):
    ours = FlaxHybridCLIP(HybridCLIPConfig.tiny("clip_text_model"), rngs=nnx.Rngs(3))
    ours.save_pretrained(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["model_type"] == "clip" and config["architectures"] == ["CLIPModel"]
    hf = transformers.CLIPModel.from_pretrained(str(tmp_path / "ours")).eval()
    ids, mask = fx.text_inputs("clip_text_model")
    px = fx.pixels()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(px))
    out = ours(jnp.asarray(ids), jnp.asarray(px.transpose(0, 2, 3, 1)), jnp.asarray(mask))
    _close(out.logits_per_text, ref.logits_per_text, "logits after CLIPModel.from_pretrained")


def test_other_heads_keep_the_dual_encoder_layout_and_round_trip(tmp_path):
    """An MLP head and a mean pooler have no CLIPModel form: saved as a dual encoder whose `medclip` section
    carries the heads and preprocessing, and loaded back to the same outputs."""
    config = HybridCLIPConfig(vision_config=TimmViTConfig.tiny(), text_config=BertConfig.tiny(), projection_dim=16,
                              text_head=HeadConfig(type="mlp", hidden_size=24, hidden_bias=False, pooler="mean"),
                              vision_head=HeadConfig(bias=True))
    ours = FlaxHybridCLIP(config, rngs=nnx.Rngs(4))
    ours.save_pretrained(tmp_path / "m")
    data = json.loads((tmp_path / "m" / "config.json").read_text())
    assert data["model_type"] == "vision-text-dual-encoder"
    assert data["medclip"]["text_head"] == {"type": "mlp", "hidden_size": 24, "hidden_bias": False, "pooler": "mean"}
    assert data["medclip"]["preprocess"]["mean"] == [0.5, 0.5, 0.5]  # timm ViT's own normalisation
    again = FlaxHybridCLIP.from_pretrained(tmp_path / "m")
    assert again.config == config
    ids, mask = fx.text_inputs("bert")
    px = jnp.asarray(fx.pixels().transpose(0, 2, 3, 1))
    np.testing.assert_allclose(np.asarray(again(jnp.asarray(ids), px, jnp.asarray(mask)).logits_per_text),
                               np.asarray(ours(jnp.asarray(ids), px, jnp.asarray(mask)).logits_per_text), atol=1e-6)


def _count(config: HybridCLIPConfig) -> int:
    abstract = nnx.eval_shape(lambda: FlaxHybridCLIP(config, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))


@pytest.mark.parametrize("patch,width,layers,heads,text_width,embed", [
    (32, 768, 12, 12, 512, 512),  # openai/clip-vit-base-patch32, PubMedCLIP
    (16, 768, 12, 12, 512, 512),  # openai/clip-vit-base-patch16
    (14, 1024, 24, 16, 768, 768),  # openai/clip-vit-large-patch14
])
def test_full_size_clip_builds_abstractly_with_the_published_parameter_count(patch, width, layers, heads,
                                                                             text_width, embed):
    vision = CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                              num_attention_heads=heads, patch_size=patch)
    text = CLIPTextConfig(hidden_size=text_width, intermediate_size=4 * text_width, num_attention_heads=text_width // 64)
    ours = _count(HybridCLIPConfig(vision_config=vision, text_config=text, projection_dim=embed))
    hf_config = transformers.CLIPConfig(vision_config=vision.to_hf_dict(), text_config=text.to_hf_dict(),
                                        projection_dim=embed)
    with torch.device("meta"):
        reference = sum(p.numel() for p in transformers.CLIPModel(hf_config).parameters())
    published = {32: 151_277_313, 16: 149_620_737, 14: 427_616_513}[patch]
    assert reference == published and ours == published
