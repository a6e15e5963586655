"""Loading paths beyond safetensors (legacy Flax msgpack, PyTorch .bin of a BertForMaskedLM), and errors
that name the offending key or file instead of silently keeping random weights."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import serialization  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from medclip import FlaxHybridCLIP  # noqa: E402
from medclip.checkpoints.conversion import WeightMismatchError  # noqa: E402
from medclip.checkpoints.readers import CheckpointError  # noqa: E402
from tests import hf_fixtures as fx  # noqa: E402


@pytest.fixture(scope="module")
def hf_bert(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_bert")
    model = fx.make_dual_encoder("bert", seed=11)
    return model, fx.save(model, folder)


def _outputs(model, ids, mask, px):
    out = model(jnp.asarray(ids), jnp.asarray(px.transpose(0, 2, 3, 1)), jnp.asarray(mask))
    return np.asarray(out.logits_per_image)


def _to_flax_tree(state_dict: dict) -> dict:
    """What transformers' Flax hybrid CLIP saved: kernels (in, out), conv HWIO, `scale`, `embedding`, and
    the vision tower nested twice (`vision_model.vision_model`)."""
    tree: dict = {}
    for key, tensor in state_dict.items():
        value = tensor.numpy()
        head, _, leaf = key.rpartition(".")
        if leaf == "weight" and value.ndim == 4:
            leaf, value = "kernel", value.transpose(2, 3, 1, 0)
        elif leaf == "weight" and "embedding" in head:
            leaf = "embedding"
        elif leaf == "weight" and value.ndim == 2:
            leaf, value = "kernel", value.T
        elif leaf == "weight":
            leaf = "scale"
        parts = (f"{head}.{leaf}" if head else leaf).split(".")
        if parts[0] == "vision_model":
            parts = ["vision_model", *parts]
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def test_legacy_flax_hybrid_msgpack_loads(tmp_path, hf_bert):
    model, folder = hf_bert
    target = tmp_path / "flax"
    target.mkdir()
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "hybrid-clip"  # the original flax-community medclip-roco config
    (target / "config.json").write_text(json.dumps(config))
    (target / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(_to_flax_tree(model.state_dict())))
    ids, mask = fx.text_inputs("bert")
    px = fx.pixels()
    np.testing.assert_allclose(_outputs(FlaxHybridCLIP.from_pretrained(target), ids, mask, px),
                               _outputs(FlaxHybridCLIP.from_pretrained(folder), ids, mask, px), atol=1e-5)


def test_bert_for_pretraining_bin_with_gamma_beta_names(tmp_path):
    """SciBERT-style: a legacy-format pytorch_model.bin of BertForPreTraining (`bert.` prefix, `cls.*` heads,
    LayerNorm gamma/beta as in TF-converted checkpoints, no model_type in config.json)."""
    mlm = transformers.BertForPreTraining(fx.hf_text_config("bert")).eval()
    fx.randomize(mlm, 2)
    folder = tmp_path / "scibert_scivocab_uncased"
    folder.mkdir()
    config = mlm.config.to_dict()
    config.pop("model_type")
    config["architectures"] = ["BertForPreTraining"]
    (folder / "config.json").write_text(json.dumps(config))
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in mlm.state_dict().items()}
    torch.save(renamed, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    vision = transformers.CLIPVisionModel(fx.hf_vision_config())
    ours = FlaxHybridCLIP.from_text_vision_pretrained(folder, fx.save(vision, tmp_path / "v"))
    assert ours.config.text_config.model_type == "bert"
    ids, mask = fx.text_inputs("bert")
    with torch.no_grad():
        ref = mlm.bert(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).pooler_output.numpy()
    ours_pooled = np.asarray(ours.text_model(jnp.asarray(ids), jnp.asarray(mask))[1])
    assert np.abs(ours_pooled - ref).max() < 1e-4


def test_masked_lm_without_pooler_warns_and_initialises_it(tmp_path, caplog):
    mlm = transformers.BertForMaskedLM(fx.hf_text_config("bert"))
    vision = transformers.CLIPVisionModel(fx.hf_vision_config())
    with caplog.at_level("WARNING"):
        ours = FlaxHybridCLIP.from_text_vision_pretrained(fx.save(mlm, tmp_path / "mlm"),
                                                          fx.save(vision, tmp_path / "v"))
    assert "has no text_model.pooler.kernel" in caplog.text
    assert float(np.abs(np.asarray(ours.text_model.pooler.kernel[...])).sum()) > 0


def _copy(folder, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def _edit_weights(folder, edit):
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_missing_key_is_named(tmp_path, hf_bert):
    folder = _copy(hf_bert[1], tmp_path)
    _edit_weights(folder, lambda t: t.pop("text_model.encoder.layer.1.output.dense.weight"))
    with pytest.raises(WeightMismatchError, match=r"missing from checkpoint[\s\S]*text_model.encoder.layers.1.mlp.fc2.kernel"):
        FlaxHybridCLIP.from_pretrained(folder)


def test_unused_key_is_named(tmp_path, hf_bert):
    folder = _copy(hf_bert[1], tmp_path)
    _edit_weights(folder, lambda t: t.__setitem__("text_model.encoder.layer.7.output.dense.weight",
                                                  np.zeros((32, 48), np.float32)))
    with pytest.raises(WeightMismatchError, match=r"unused checkpoint keys[\s\S]*layer\.7\.output\.dense\.weight"):
        FlaxHybridCLIP.from_pretrained(folder)


def test_wrong_shape_is_named(tmp_path, hf_bert):
    folder = _copy(hf_bert[1], tmp_path)
    _edit_weights(folder, lambda t: t.__setitem__("visual_projection.weight", np.zeros((8, 32), np.float32)))
    with pytest.raises(WeightMismatchError, match=r"visual_projection.weight: checkpoint \(32, 8\) vs model \(32, 16\)"):
        FlaxHybridCLIP.from_pretrained(folder)


def test_config_sizes_disagreeing_with_weights(tmp_path, hf_bert):
    folder = _copy(hf_bert[1], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightMismatchError, match="text_model.encoder.layers.2"):
        FlaxHybridCLIP.from_pretrained(folder)


def test_unknown_model_type(tmp_path, hf_bert):
    folder = _copy(hf_bert[1], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown text model_type 'gpt2'"):
        FlaxHybridCLIP.from_pretrained(folder)


def test_corrupt_weights_file_is_named(tmp_path, hf_bert):
    folder = _copy(hf_bert[1], tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        FlaxHybridCLIP.from_pretrained(folder)


def test_missing_folder_and_missing_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FlaxHybridCLIP.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(
        {"model_type": "vision-text-dual-encoder", "vision_config": {"model_type": "clip_vision_model"},
         "text_config": {"model_type": "bert"}}))
    with pytest.raises(CheckpointError, match="empty"):
        FlaxHybridCLIP.from_pretrained(tmp_path / "empty")


def test_vision_tower_from_wrong_checkpoint(tmp_path):
    bert = transformers.BertModel(fx.hf_text_config("bert"))
    text_folder = fx.save(bert, tmp_path / "bert")
    wrong = _copy(text_folder, tmp_path)
    (wrong / "config.json").write_text(json.dumps(fx.hf_vision_config().to_dict()))
    with pytest.raises(WeightMismatchError, match="no weights of this tower"):
        FlaxHybridCLIP.from_text_vision_pretrained(text_folder, wrong)
