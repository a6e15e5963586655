"""A model's inputs travel with it (issue 23): its context length, padding rule and whether the padding is attended
to (PMC-CLIP's encode_text pads to 77 and calls BERT and its fusion module without a mask), and its image resize.
Training, the text cache, packing and the Embedder (medclip embed / search / rank / zeroshot, evaluate, the app)
read them from the saved config. Torch references where the behaviour is a reference's."""

from __future__ import annotations

import dataclasses
import io
import json
import types

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from medclip import FlaxHybridCLIP, HybridCLIPConfig
from medclip.models.fusion import FusionConfig
from medclip.models.heads import project
from medclip.models.preprocess import PMC_CLIP_TEXT, Preprocess, TextPreprocess

NO_MASK = TextPreprocess(context_length=16, padding="max_length", mask_padding=False)


def _tiny_model(text_preprocess: TextPreprocess = TextPreprocess(), vocab_size: int = 99, **changes) -> FlaxHybridCLIP:
    config = HybridCLIPConfig.tiny()
    config = config.replace(text_config=dataclasses.replace(config.text_config, vocab_size=vocab_size,
                                                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                            text_preprocess=text_preprocess, **changes)
    return FlaxHybridCLIP(config, rngs=nnx.Rngs(0))


def _padded_ids(length: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Three captions of 16, 11 and 6 tokens padded to `length` with BERT's [PAD] (0), [CLS] (2) first."""
    rng = np.random.default_rng(0)
    mask = np.zeros((3, length), np.int32)
    for row, n in enumerate((16, 11, 6)):
        mask[row, :n] = 1
    ids = np.where(mask == 1, rng.integers(5, 90, size=(3, length)), 0).astype(np.int32)
    ids[:, 0] = 2
    return ids, mask


def test_text_and_image_preprocess_are_saved_and_read_back(tmp_path):
    model = _tiny_model(TextPreprocess(context_length=32, padding="max_length", mask_padding=False, clean="openclip"),
                        preprocess=Preprocess(resample="pil_bicubic", crop_rounding="floor"))
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())["medclip"]
    assert saved["text_preprocess"] == {"context_length": 32, "padding": "max_length", "mask_padding": False,
                                        "clean": "openclip"}
    assert saved["preprocess"]["resample"] == "pil_bicubic" and saved["preprocess"]["crop_rounding"] == "floor"
    loaded = FlaxHybridCLIP.from_pretrained(tmp_path / "m")
    assert loaded.config.text_preprocess == model.config.text_preprocess and loaded.config.context_length == 32
    assert loaded.config.preprocess == model.config.preprocess
    # Without a context length: the tower's positions, at most 77 (the tiny BERT has 40)
    assert HybridCLIPConfig.tiny().context_length == 40


@pytest.mark.parametrize("kwargs, words", [({"padding": "right"}, "padding 'right'"),
                                           ({"mask_padding": False}, "max_length"),
                                           ({"context_length": 1}, "context_length")])
def test_bad_text_preprocess_is_refused_by_name(kwargs, words):
    with pytest.raises(ValueError, match=words):
        TextPreprocess(**kwargs)


def test_context_length_beyond_the_towers_positions_is_refused():
    with pytest.raises(ValueError, match="40 positions"):
        HybridCLIPConfig.tiny().replace(text_preprocess=TextPreprocess(context_length=64))
    with pytest.raises(ValueError, match="resample 'lanczos'"):
        Preprocess(resample="lanczos")


def test_unmasked_cls_state_equals_torch_bert_called_without_a_mask(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tests import hf_fixtures as fx

    hf_text = transformers.BertModel(fx.hf_text_config("bert")).eval()
    fx.randomize(hf_text, 3)
    hf_vision = transformers.CLIPVisionModel(fx.hf_vision_config()).eval()
    ours = FlaxHybridCLIP.from_text_vision_pretrained(fx.save(hf_text, tmp_path / "t"), fx.save(hf_vision, tmp_path / "v"))
    ours.config = ours.config.replace(text_preprocess=NO_MASK,
                                      text_head=dataclasses.replace(ours.config.text_head, pooler="cls"))
    ids, mask = _padded_ids()
    with torch.no_grad():
        unmasked = hf_text(input_ids=torch.tensor(ids, dtype=torch.long)).last_hidden_state[:, 0].numpy()
        masked = hf_text(input_ids=torch.tensor(ids, dtype=torch.long),
                         attention_mask=torch.tensor(mask)).last_hidden_state[:, 0].numpy()
    cls = ours.text_model(jnp.asarray(ids), ours.config.text_attention_mask(jnp.asarray(mask)), pooler="cls")[1]
    np.testing.assert_allclose(np.asarray(cls), unmasked, atol=1e-5)
    features = ours.get_text_features(jnp.asarray(ids), jnp.asarray(mask))  # the mask is given and not used
    expected = project(ours.text_projection, ours.config.text_head, jnp.asarray(unmasked), None)
    np.testing.assert_allclose(np.asarray(features), np.asarray(expected), atol=1e-5)
    assert np.abs(unmasked - masked)[1:].max() > 1e-3  # padded rows differ: the test can tell the two apart
    ours.config = ours.config.replace(text_preprocess=TextPreprocess(context_length=16))  # the masked option
    cls = ours.text_model(jnp.asarray(ids), ours.config.text_attention_mask(jnp.asarray(mask)), pooler="cls")[1]
    np.testing.assert_allclose(np.asarray(cls), masked, atol=1e-5)


def _torch_fusion(tensors: dict[str, np.ndarray], layers: int, width: int, heads: int):
    """PMC-CLIP's fusion path (blocks.py Transformer of ResidualAttentionBlocks, then the MLM projection)."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(width, heads)
            self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
            self.mlp = nn.Sequential()
            self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
            self.mlp.add_module("gelu", nn.GELU())
            self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

        def forward(self, x):
            h = self.ln_1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            return x + self.mlp(self.ln_2(x))

    blocks = nn.ModuleList([Block() for _ in range(layers)])
    state = {k.removeprefix("fusion_module.resblocks."): torch.from_numpy(np.array(v)) for k, v in tensors.items()
             if k.startswith("fusion_module.")}
    blocks.load_state_dict(state)
    special, mlm = (torch.from_numpy(np.array(tensors[k])) for k in ("img_special_token", "mlm_projection"))

    def run(text_hidden: np.ndarray, image_embeds: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.array(text_hidden))
        batch = x.shape[0]
        x = torch.cat([x, special.expand(batch, -1, -1), torch.from_numpy(np.array(image_embeds))[:, None]], dim=1)
        x = x.permute(1, 0, 2)
        for block in blocks.eval():
            x = block(x)
        return (x.permute(1, 0, 2)[:, :-2] @ mlm).detach().numpy()

    return run


def test_unmasked_fusion_equals_pmc_clips_fusion_module():
    pytest.importorskip("torch")
    from medclip.checkpoints.pretrained import model_tensors_hf

    model = _tiny_model(NO_MASK, fusion=FusionConfig(num_layers=2, num_heads=4), projection_dim=32)
    ids, mask = _padded_ids()
    pixels = jnp.asarray(np.random.default_rng(1).normal(size=(3, 32, 32, 3)), jnp.float32)
    out = model(jnp.asarray(ids), pixels, jnp.asarray(mask), mlm=True)
    hidden = model.text_model(jnp.asarray(ids), None)[0]
    reference = _torch_fusion(model_tensors_hf(model), 2, 32, 4)(np.asarray(hidden), np.asarray(out.image_embeds))
    np.testing.assert_allclose(np.asarray(out.mlm_logits), reference, atol=1e-4)
    masked = model.fusion(hidden, out.image_embeds, jnp.asarray(mask))
    assert np.abs(np.asarray(masked) - reference)[1:].max() > 1e-3


def test_no_mask_mode_has_no_text_packing_and_the_text_cache_pools_as_the_step():
    from medclip.models.packing import plan_packing
    from medclip.training.text_cache import pooled_text_features
    from medclip.training.trainer import Trainer

    model = _tiny_model(NO_MASK)
    ids, mask = _padded_ids()
    plan = plan_packing(mask, groups=1, sizes=8)
    assert plan is not None
    with pytest.raises(ValueError, match="mask_padding=False"):
        model.get_text_features(jnp.asarray(ids), jnp.asarray(mask), text_packing=plan)
    trainer = types.SimpleNamespace(model=model, text_cached=False, args=types.SimpleNamespace(text_packing_sizes=8))
    assert Trainer._packing_plan(trainer, mask) is None
    trainer.model = _tiny_model(TextPreprocess(context_length=16))
    assert Trainer._packing_plan(trainer, mask) is not None
    pooled = pooled_text_features(model, ids, mask, batch_size=4, progress=False)
    features = project(model.text_projection, model.config.text_head, jnp.asarray(pooled), None)
    np.testing.assert_allclose(np.asarray(features), np.asarray(model.get_text_features(jnp.asarray(ids),
                                                                                       jnp.asarray(mask))), atol=1e-5)


def _saved(tmp_path, text_preprocess: TextPreprocess):
    from medclip.data.synthetic import write_synthetic_tokenizer

    tokenizer = write_synthetic_tokenizer(tmp_path / "tok")
    model = _tiny_model(text_preprocess, vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "m", tokenizer=tokenizer)
    return model, tokenizer


LONG = " ".join(["chest x-ray showing a nodule in the right lower lobe"] * 8)


def test_embedder_truncates_at_the_models_context_length(tmp_path):
    from medclip.inference.embedder import Embedder

    model, tokenizer = _saved(tmp_path, TextPreprocess(context_length=32))
    embedder = Embedder(tmp_path / "m", batch_size=2)
    assert embedder.max_seq_length == 32
    ids, mask = embedder._tokenize([LONG, "ct of the abdomen"])
    assert ids.shape[1] == 32 and mask[0].sum() == 32
    encoded = tokenizer([LONG], truncation=True, max_length=32, return_tensors="np")
    expected = model.get_text_features(jnp.asarray(encoded["input_ids"], jnp.int32),
                                       jnp.asarray(encoded["attention_mask"], jnp.int32))
    expected = np.asarray(expected / jnp.linalg.norm(expected, axis=-1, keepdims=True))
    np.testing.assert_allclose(embedder.embed_texts([LONG]), expected, atol=1e-5)
    assert Embedder(tmp_path / "m", batch_size=2, max_seq_length=16).max_seq_length == 16  # an explicit override


def test_embedder_pads_to_the_context_length_when_the_padding_is_attended(tmp_path):
    from medclip.inference.embedder import Embedder

    _saved(tmp_path, NO_MASK)
    embedder = Embedder(tmp_path / "m", batch_size=2)
    assert embedder._tokenize(["ct"])[0].shape[1] == 16  # no pad-to-longest
    alone = embedder.embed_texts(["ct of the abdomen"])
    with_long = embedder.embed_texts(["ct of the abdomen", LONG])[:1]
    np.testing.assert_allclose(alone, with_long, atol=1e-6)


def test_training_takes_the_models_context_length_unless_given_and_saves_it(tmp_path):
    from medclip.training.arguments import DataArguments, ModelArguments
    from medclip.training.model_setup import build_model_and_tokenizer

    _saved(tmp_path, TextPreprocess(context_length=32))
    data = DataArguments()
    model, _ = build_model_and_tokenizer(ModelArguments(model_name_or_path=str(tmp_path / "m")), data, jnp.float32,
                                         0, tmp_path)
    assert data.max_seq_length == 32 and model.config.context_length == 32
    data = DataArguments(max_seq_length=24)
    model, _ = build_model_and_tokenizer(ModelArguments(model_name_or_path=str(tmp_path / "m"),
                                                        text_mask_padding=False), data, jnp.float32, 0, tmp_path)
    assert data.max_seq_length == 24
    assert model.config.text_preprocess == TextPreprocess(context_length=24, padding="max_length", mask_padding=False)
    model.save_pretrained(tmp_path / "trained")
    assert FlaxHybridCLIP.from_pretrained(tmp_path / "trained").config.text_preprocess == model.config.text_preprocess


def test_pmc_clip_text_preprocess_is_its_encode_text():
    assert PMC_CLIP_TEXT == TextPreprocess(context_length=77, padding="max_length", mask_padding=False)


def test_open_clip_folders_carry_their_context_length_and_pil_resize():
    from medclip.checkpoints.openclip import OpenCLIPConfigError, config_from_open_clip

    model_cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8},
                 "text_cfg": {"context_length": 32, "vocab_size": 99, "width": 32, "heads": 4, "layers": 2}}
    config = config_from_open_clip(model_cfg)
    assert config.context_length == 32 and config.text_preprocess.mask_padding
    assert config.preprocess.resample == "pil_bicubic" and config.preprocess.crop_rounding == "round"
    bilinear = config_from_open_clip(model_cfg, {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"})
    assert bilinear.preprocess.resample == "pil_bilinear" and bilinear.preprocess.mean == (0.5, 0.5, 0.5)
    with pytest.raises(OpenCLIPConfigError, match="interpolation 'lanczos'"):
        config_from_open_clip(model_cfg, {"interpolation": "lanczos"})


def _jpeg(width: int, height: int, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(width * height)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    pixels = (pixels.astype(np.float32) * 0.3 + np.linspace(0, 170, width)[None, :, None]).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize("width, height, mode", [(90, 61, "RGB"), (47, 100, "L"), (32, 39, "RGB")])
def test_pil_path_equals_transformers_pil_image_processor(width, height, mode):
    pytest.importorskip("transformers")
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    import tensorflow as tf

    from medclip.data.images import eval_image, normalize, pil_resize_crop

    data = _jpeg(width, height, mode)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    reference = processor(images=Image.open(io.BytesIO(data)), return_tensors="np")["pixel_values"][0]
    preprocess = Preprocess(resample="pil_bicubic", crop_rounding="floor")
    ours = np.asarray(eval_image(tf.constant(data), 32, preprocess))
    np.testing.assert_allclose(ours, reference.transpose(1, 2, 0), atol=1e-5)
    raw = pil_resize_crop(data, 32, crop_rounding="floor")
    np.testing.assert_allclose(ours, np.asarray(normalize(raw)), atol=1e-6)
    fast = np.asarray(eval_image(tf.constant(data), 32, Preprocess()))
    assert np.abs(fast - ours).max() > 1e-2  # the fast path is not PIL's


def test_crop_rounding_follows_torchvision_or_transformers():
    from medclip.data.images import pil_resize_crop

    data = _jpeg(32, 39)  # no resize; a 7-row margin: torchvision starts at round(3.5) = 4, transformers at 3
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float32)
    np.testing.assert_array_equal(pil_resize_crop(data, 32, crop_rounding="round"), decoded[4:36])
    np.testing.assert_array_equal(pil_resize_crop(data, 32, crop_rounding="floor"), decoded[3:35])


def test_openclip_caption_cleaning_is_what_open_clip_tokenizes():
    """open_clip's HF tokenizer cleans captions first (ftfy, HTML entities, whitespace): the model's tokenizer
    wrapper sends the same text, and a model without cleaning sends the caption unchanged."""
    from medclip.checkpoints.tokenizers import CleaningTokenizer, for_model_text
    from medclip.models.preprocess import clean_caption

    caption = "Axial CT\u2019s  image &amp;amp; a   \u201clesion\u201d\n"
    assert clean_caption(caption, "openclip") == "Axial CT's image & a \"lesion\""
    assert clean_caption(caption, "none") == caption
    seen = []
    wrapped = for_model_text(lambda texts, **kw: seen.append(texts) or len(texts), TextPreprocess(clean="openclip"))
    assert isinstance(wrapped, CleaningTokenizer) and wrapped([caption, "a  b"]) == 2
    assert seen == [["Axial CT's image & a \"lesion\"", "a b"]]
    plain = object()
    assert for_model_text(plain, TextPreprocess()) is plain
    assert for_model_text(wrapped, TextPreprocess()) is wrapped.tokenizer
