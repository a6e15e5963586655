"""timm's convolutional towers (ResNet, EfficientNetV2) against timm through golden fixtures (tests/golden/README.md):
eval-mode features, a train-mode forward and the running statistics it leaves, full-size forwards with the
fixtures' regenerated weights and the published parameter counts; loading from timm's hub folder as the vision
tower of `from_text_vision_pretrained`, and as the trunk of an OpenCLIP model. No torch needed."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from medclip import FlaxHybridCLIP
from medclip.checkpoints import conversion
from medclip.checkpoints.assembly import (
    fill,
    model_tensors,
    param_shapes,
    tower_rules,
)
from medclip.checkpoints.openclip import OpenCLIPConfigError, config_from_open_clip
from medclip.models import BertConfig, BertTower, registry
from medclip.models.preprocess import IMAGENET_PREPROCESS
from medclip.models.timm_efficientnet import TimmEfficientNetConfig
from medclip.models.timm_resnet import TimmResNetConfig

GOLDEN = Path(__file__).parent / "golden"
sys.path.insert(0, str(GOLDEN))
from numpy_weights import load_fixture_weights

ATOL = 1e-4  # features
STATS_ATOL = 1e-5  # running statistics after one train-mode forward


def _io(name: str) -> dict[str, np.ndarray]:
    return dict(np.load(GOLDEN / name / "io.npz"))


def _nhwc(io: dict[str, np.ndarray]) -> jnp.ndarray:
    return jnp.asarray(io["pixel_values"].transpose(0, 2, 3, 1))


def _tower(config, tensors: dict[str, np.ndarray], source: str) -> nnx.Module:
    """A vision tower alone, from a timm state dict."""
    spec = registry.tower_for_config(config)
    abstract = nnx.eval_shape(lambda: spec.module_class(config, rngs=nnx.Rngs(0)))
    values = conversion.to_ours(tensors, spec.rules(config, "timm"), param_shapes(abstract), source=source)
    return fill(abstract, values)


def _max_err(ours, reference) -> float:
    return float(np.abs(np.asarray(ours) - reference).max())


def _tiny_bert_folder(folder: Path) -> Path:
    """A text tower folder in transformers' layout, written by our own BERT (the text side is not under test)."""
    config = BertConfig.tiny()
    tensors = conversion.to_hf(model_tensors(BertTower(config, rngs=nnx.Rngs(1))), tower_rules(config, "hf"))
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config.to_hf_dict()))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


TINY = [("timm_resnet50", TimmResNetConfig.tiny()), ("timm_efficientnetv2_tiny", TimmEfficientNetConfig.tiny())]


@pytest.mark.parametrize("name,config", TINY, ids=[n for n, _ in TINY])
def test_tiny_config_is_the_fixture_model_args(name, config):
    """`.tiny()` is what timm built from the fixture's config.json (model_args, pretrained_cfg input size)."""
    data = json.loads((GOLDEN / name / "config.json").read_text())
    assert registry.vision_config_from_timm(data["architecture"], **data["model_args"], img_size=64) == config
    assert config.hidden_size == data["num_features"]


@pytest.mark.parametrize("name", ["timm_resnet50", "timm_efficientnetv2_tiny"])
def test_hub_folder_loads_as_the_vision_tower_and_matches_timm(tmp_path, name):
    """timm's hub layout (config.json with architecture / model_args / pretrained_cfg + model.safetensors) through
    the public `from_text_vision_pretrained`; the pooled features equal timm's `model(x)` with num_classes=0.
    Saved in our layout and loaded back, the config and the features are unchanged."""
    model = FlaxHybridCLIP.from_text_vision_pretrained(_tiny_bert_folder(tmp_path / "text"), GOLDEN / name,
                                                       projection_dim=16)
    cfg = json.loads((GOLDEN / name / "config.json").read_text())["pretrained_cfg"]
    assert model.config.image_preprocess.mean == tuple(cfg["mean"])
    assert model.config.vision_config.image_size == cfg["input_size"][-1]
    io = _io(name)
    hidden, pooled = model.vision_model(_nhwc(io))
    assert hidden.ndim == 4 and pooled.shape == io["features"].shape
    err = _max_err(pooled, io["features"])
    assert err < ATOL, f"{name}: max abs error {err:.2e}"
    assert model.get_image_features(_nhwc(io)).shape == (3, 16)
    model.save_pretrained(tmp_path / "ours")  # our layout: the tower under vision_model.* in timm's naming
    again = FlaxHybridCLIP.from_pretrained(tmp_path / "ours")
    assert again.config == model.config
    assert _max_err(again.vision_model(_nhwc(io), pooled_only=True)[1], io["features"]) < ATOL


@pytest.mark.parametrize("name,config", TINY, ids=[n for n, _ in TINY])
def test_train_mode_forward_matches_timm_and_updates_the_running_statistics(name, config):
    """One forward in train mode: batch statistics normalise, and the running ones move as torch moves them
    (momentum 0.1, unbiased variance); the stored `num_batches_tracked` is not ours to keep."""
    tower = _tower(config, load_file(GOLDEN / name / "model.safetensors"), name)
    io = _io(name)
    _, pooled = tower(_nhwc(io), train=True)
    err = _max_err(pooled, io["features_train_mode"])
    assert err < ATOL, f"{name} train mode: max abs error {err:.2e}"
    stats = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(tower, nnx.BatchStat))}
    ours = conversion.to_hf(stats, registry.tower_for_config(config).rules(config, "timm"))
    reference = {k: v for k, v in load_file(GOLDEN / name / "bn_after_train_step.safetensors").items()
                 if not k.endswith("num_batches_tracked")}
    assert set(ours) == set(reference)
    worst = max(_max_err(ours[k], reference[k]) for k in reference)
    assert worst < STATS_ATOL, f"{name} running statistics: max abs error {worst:.2e}"
    _, again = tower(_nhwc(io))  # eval mode now reads the updated statistics
    assert _max_err(again, io["features"]) > ATOL


FULL = [("timm_resnet50_full", "resnet50", 2048), ("timm_efficientnetv2_s_full", "tf_efficientnetv2_s", 1280)]


@pytest.mark.parametrize("name,architecture,width", FULL, ids=[n for n, _, _ in FULL])
def test_full_size_forward_matches_timm(name, architecture, width):
    config = registry.vision_config_from_timm(architecture, num_classes=0)
    tower = _tower(config, load_fixture_weights(GOLDEN / name), name)
    io = _io(name)
    _, pooled = tower(_nhwc(io), pooled_only=True)
    assert pooled.shape == (2, width)
    err = _max_err(pooled, io["features"])
    assert err < ATOL, f"{name}: max abs error {err:.2e}"


@pytest.mark.parametrize("architecture,key", [
    ("resnet50", "timm resnet50 num_classes=0"),
    ("tf_efficientnetv2_s", "timm tf_efficientnetv2_s num_classes=0"),
    ("tf_efficientnetv2_m", "timm tf_efficientnetv2_m num_classes=0"),
])
def test_full_size_builds_abstractly_with_the_published_parameter_count(architecture, key):
    """Parameters only (nnx.Param), as torch's parameters(): running statistics are buffers."""
    counts = json.loads((GOLDEN / "param_counts.json").read_text())
    config = registry.vision_config_from_timm(architecture)
    abstract = nnx.eval_shape(lambda: registry.build_tower(config, dtype=jnp.float32, remat=False,
                                                           rngs=nnx.Rngs(0)))
    total = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    assert total == counts[key]["total"]


@pytest.mark.parametrize("architecture,count", [("resnet18", 11_176_512), ("resnet34", 21_284_672),
                                                ("resnet101", 42_500_160)])
def test_other_resnets_build_with_timms_parameter_counts(architecture, count):
    """timm's published totals (resnet18 11,689,512, resnet34 21,797,672, resnet101 44,549,160) less the
    1000-class fc; BasicBlock's forward has no golden fixture."""
    config = registry.vision_config_from_timm(architecture)
    abstract = nnx.eval_shape(lambda: registry.build_tower(config, dtype=jnp.float32, remat=False,
                                                           rngs=nnx.Rngs(0)))
    assert sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))) == count


def test_unknown_timm_architecture_is_refused_naming_it_and_what_is_supported(tmp_path):
    with pytest.raises(registry.UnknownArchitectureError,
                       match=r"'regnety_040'.*vit_.*resnet50.*tf_efficientnetv2_s.*tf_efficientnetv2_m.*convnext_"):
        registry.vision_config_from_timm("regnety_040")
    with pytest.raises(registry.UnsupportedOptionError, match=r"\['stem_width_x'\] for resnet50"):
        registry.vision_config_from_timm("resnet50", stem_width_x=32)
    with pytest.raises(registry.UnsupportedOptionError, match=r"'output_stride': 16.*resnet50"):
        registry.vision_config_from_timm("resnet50", output_stride=16)
    folder = tmp_path / "v"
    shutil.copytree(GOLDEN / "timm_resnet50", folder)
    data = json.loads((folder / "config.json").read_text())
    data["architecture"] = "resnet50d"
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(registry.UnknownArchitectureError, match=r"config\.json: timm architecture 'resnet50d'"):
        FlaxHybridCLIP.from_text_vision_pretrained(_tiny_bert_folder(tmp_path / "text"), folder)


def test_a_classifier_in_the_checkpoint_is_skipped_and_said(tmp_path, caplog):
    """timm's hub checkpoints carry the ImageNet classifier (`fc.*` for ResNet); the trunk does not use it."""
    folder = tmp_path / "v"
    shutil.copytree(GOLDEN / "timm_resnet50", folder)
    tensors = load_file(folder / "model.safetensors")
    tensors.update({"fc.weight": np.zeros((10, 256), np.float32), "fc.bias": np.zeros(10, np.float32)})
    save_file(tensors, str(folder / "model.safetensors"))
    with caplog.at_level(logging.INFO, logger="medclip.checkpoints"):
        model = FlaxHybridCLIP.from_text_vision_pretrained(_tiny_bert_folder(tmp_path / "text"), folder)
    assert "skipping 2 keys the tower does not use (fc.bias" in caplog.text
    io = _io("timm_resnet50")
    assert _max_err(model.vision_model(_nhwc(io), pooled_only=True)[1], io["features"]) < ATOL


def _resnet_open_clip_cfg(**vision: object) -> dict:
    return {"embed_dim": 16,
            "vision_cfg": {"timm_model_name": "resnet50", "timm_model_pretrained": False, "timm_pool": "avg",
                           "timm_proj": "linear", "image_size": 64,
                           "timm_model_kwargs": {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}, **vision},
            "text_cfg": {"context_length": 16, "vocab_size": 99, "width": 32, "heads": 4, "layers": 2}}


@pytest.mark.parametrize("proj", ["linear", "mlp"])
def test_open_clip_model_with_a_resnet_trunk_round_trips_with_its_statistics(tmp_path, proj):
    """open_clip's TimmModel layout (`visual.trunk.*`, `visual.head.proj` / `visual.head.mlp`): built from a
    model_cfg, saved with our save_open_clip (running statistics as `running_mean` / `running_var`) and loaded
    back with equal outputs and statistics."""
    config = config_from_open_clip(_resnet_open_clip_cfg(timm_proj=proj))
    assert isinstance(config.vision_config, TimmResNetConfig) and config.vision_config.hidden_size == 256
    assert config.image_preprocess == IMAGENET_PREPROCESS.replace(resample="pil_bicubic")  # open_clip resizes in PIL
    model = FlaxHybridCLIP(config, rngs=nnx.Rngs(3))
    io = _io("timm_resnet50")
    px = _nhwc(io)
    model.get_image_features(px, train=True)  # running statistics away from their (0, 1) start
    out = model.save_open_clip(tmp_path / "oc")
    keys = set(load_file(out / "open_clip_model.safetensors"))
    assert {"visual.trunk.conv1.weight", "visual.trunk.layer1.0.downsample.1.running_var"} <= keys
    assert ("visual.head.proj.weight" if proj == "linear" else "visual.head.mlp.fc1.weight") in keys
    again = FlaxHybridCLIP.from_pretrained(out)
    ids = jnp.asarray(np.array([[97, 5, 6, 98], [97, 7, 98, 0]]))
    a, b = model(ids, px), again(ids, px)
    np.testing.assert_allclose(np.asarray(a.logits_per_image), np.asarray(b.logits_per_image), atol=1e-6)
    for (path, x), (_, y) in zip(nnx.to_flat_state(nnx.state(model, nnx.BatchStat)),
                                 nnx.to_flat_state(nnx.state(again, nnx.BatchStat))):
        np.testing.assert_array_equal(np.asarray(x[...]), np.asarray(y[...]), err_msg=str(path))


def test_open_clip_timm_trunk_pool_options():
    """"" is the trunk's default pooling (average for a convnet); absent means open_clip's default "avg", which
    a ViT trunk would average its tokens with (not built); attention pools are refused."""
    assert isinstance(config_from_open_clip(_resnet_open_clip_cfg(timm_pool="")).vision_config, TimmResNetConfig)
    with pytest.raises(OpenCLIPConfigError, match="timm_pool 'abs_attn'"):
        config_from_open_clip(_resnet_open_clip_cfg(timm_pool="abs_attn"))
    vit = _resnet_open_clip_cfg(timm_model_name="vit_base_patch16_224", timm_model_kwargs={})
    del vit["vision_cfg"]["timm_pool"]
    with pytest.raises(OpenCLIPConfigError, match="timm_pool 'avg'.*vit_base_patch16_224"):
        config_from_open_clip(vit)


