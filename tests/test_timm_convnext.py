"""timm's ConvNeXt as a vision tower against timm's own code through golden fixtures (tests/golden/README.md:
`timm_convnext_tiny`, Linear MLP with layer scale; `timm_convnext_atto_tiny`, 1x1-convolution MLP): eval-mode
features and feature maps, the two-way conversion table, timm's drop path schedule, drop path in training, the
image cache's refusal of a stochastic tower, full-size parameter counts, the OpenCLIP route. No torch needed."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from medclip import FlaxHybridCLIP
from medclip.checkpoints import conversion
from medclip.checkpoints.assembly import fill, model_tensors
from medclip.checkpoints.openclip import OpenCLIPConfigError, config_from_open_clip
from medclip.models import kernels, registry
from medclip.models.layers import drop_path
from medclip.models.timm_convnext import TimmConvNeXt, TimmConvNeXtConfig, timm_rules
from medclip.training.image_cache import why_not_cacheable
from medclip.training.tower_configs import parse_tower_config
from tests.test_conv_towers import _io, _max_err, _nhwc, _tiny_bert_folder, _tower

GOLDEN = Path(__file__).parent / "golden"
ATOL = 1e-5  # fp32, eval mode
FIXTURES = ["timm_convnext_tiny", "timm_convnext_atto_tiny"]


def _fixture_config(name: str, **timm_kwargs) -> TimmConvNeXtConfig:
    data = json.loads((GOLDEN / name / "config.json").read_text())
    return registry.vision_config_from_timm(data["architecture"], **data["model_args"], img_size=64, **timm_kwargs)


def _fixture_tower(name: str, **timm_kwargs) -> nnx.Module:
    return _tower(_fixture_config(name, **timm_kwargs), load_file(GOLDEN / name / "model.safetensors"), name)


def test_tiny_config_is_the_fixture_model_args():
    data = json.loads((GOLDEN / "timm_convnext_tiny" / "config.json").read_text())
    assert _fixture_config("timm_convnext_tiny") == TimmConvNeXtConfig.tiny()
    assert TimmConvNeXtConfig.tiny().hidden_size == data["num_features"]
    atto = _fixture_config("timm_convnext_atto_tiny")
    assert atto.conv_mlp and atto.kernel_sizes == (3, 3, 3, 3) and atto.ls_init_value == 1e-6


@pytest.mark.parametrize("mode", ["cpu", "plain"])
@pytest.mark.parametrize("name", FIXTURES)
def test_eval_features_and_feature_map_match_timm(name, mode):
    """Pooled features = timm's model(x) with num_classes=0 (average pool + head.norm); the feature map =
    forward_features(x), NCHW there; in both kernel forms."""
    io = _io(name)
    with kernels.forced(mode):
        hidden, pooled = _fixture_tower(name)(_nhwc(io))
    err_pooled = _max_err(pooled, io["features"])
    err_map = _max_err(hidden, io["feature_map"].transpose(0, 2, 3, 1))
    assert err_pooled < ATOL, f"{name} ({mode}): pooled max abs error {err_pooled:.2e}"
    assert err_map < ATOL, f"{name} ({mode}): feature map max abs error {err_map:.2e}"
    assert float(np.abs(io["features"][0] - io["features"][1]).max()) > 0.1  # the features see the image


def test_hub_folder_loads_as_the_vision_tower_and_round_trips(tmp_path):
    """timm's hub layout through the public `from_text_vision_pretrained`, then our layout and back."""
    name = "timm_convnext_tiny"
    model = FlaxHybridCLIP.from_text_vision_pretrained(_tiny_bert_folder(tmp_path / "text"), GOLDEN / name,
                                                       projection_dim=16)
    assert model.config.vision_config == TimmConvNeXtConfig.tiny()
    io = _io(name)
    assert _max_err(model.vision_model(_nhwc(io), pooled_only=True)[1], io["features"]) < ATOL
    model.save_pretrained(tmp_path / "ours")
    again = FlaxHybridCLIP.from_pretrained(tmp_path / "ours")
    assert again.config == model.config
    assert _max_err(again.vision_model(_nhwc(io), pooled_only=True)[1], io["features"]) < ATOL


@pytest.mark.parametrize("name", FIXTURES)
def test_conversion_table_is_two_way_and_names_every_bad_key(name):
    """Ours -> timm gives back timm's state dict exactly (layer scale `gamma` included, which is no LayerNorm's
    gamma); a checkpoint with a stray, a missing and a misshapen key fails once, naming all three."""
    config = _fixture_config(name)
    reference = load_file(GOLDEN / name / "model.safetensors")
    ours = conversion.to_hf(model_tensors(_fixture_tower(name)), timm_rules(config))
    assert set(ours) == set(reference)
    assert all(np.array_equal(ours[k], reference[k]) for k in reference)
    bad = dict(reference)
    del bad["stages.1.blocks.0.gamma"]
    bad["stages.0.blocks.0.mlp.fc1.bias"] = np.zeros(3, np.float32)
    bad["stages.9.blocks.0.norm.weight"] = np.zeros(8, np.float32)
    with pytest.raises(conversion.WeightMismatchError) as error:
        _tower(config, bad, name)
    message = str(error.value)
    for key in ("stages.1.blocks.0.gamma", "stages.0.blocks.0.mlp.fc1.bias", "stages.9.blocks.0.norm.weight"):
        assert key.split(".gamma")[0] in message, key


def test_drop_path_rates_are_timms():
    """timm's stochastic depth schedule: linspace(0, rate, all blocks), split by stage (fixture: rate 0.1)."""
    config = _fixture_config("timm_convnext_tiny", drop_path_rate=0.1)
    flat = [r for stage in config.drop_path_rates() for r in stage]
    np.testing.assert_allclose(flat, _io("timm_convnext_tiny")["drop_path_rates"], atol=1e-7)
    assert config.stochastic and not TimmConvNeXtConfig.tiny().stochastic


def test_drop_path_is_active_with_a_key_and_deterministic_given_it():
    io = _io("timm_convnext_tiny")
    px = _nhwc(io)
    tower = _fixture_tower("timm_convnext_tiny", drop_path_rate=0.5)
    _, eval_out = tower(px, train=True)  # no key: inference, whatever `train` says
    assert _max_err(eval_out, io["features"]) < ATOL
    key = jax.random.key(0)
    _, a = tower(px, dropout_rng=key, pooled_only=True)
    _, b = tower(px, dropout_rng=key, pooled_only=True)
    _, c = tower(px, dropout_rng=jax.random.key(1), pooled_only=True)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert _max_err(a, io["features"]) > 1e-3 and _max_err(a, c) > 1e-3
    _, quiet = _fixture_tower("timm_convnext_tiny")(px, dropout_rng=key)  # rate 0: the key changes nothing
    np.testing.assert_array_equal(np.asarray(quiet), np.asarray(eval_out))
    remat = fill(nnx.eval_shape(lambda: TimmConvNeXt(tower.config, remat=True, rngs=nnx.Rngs(0))),
                 model_tensors(tower))
    np.testing.assert_allclose(np.asarray(remat(px, dropout_rng=key, pooled_only=True)[1]), np.asarray(a),
                               atol=1e-6)  # the same blocks dropped under rematerialisation


def test_drop_path_drops_whole_examples_and_rescales_the_rest():
    x = jnp.ones((64, 2, 2, 3))
    y = np.asarray(drop_path(x, 0.25, jax.random.key(0)))
    per_example = y.reshape(64, -1)
    assert set(np.unique(per_example)) <= {0.0, np.float32(1 / 0.75)}
    assert (per_example == per_example[:, :1]).all()  # one decision per example
    assert 0 < (per_example[:, 0] == 0).sum() < 64
    assert drop_path(x, 0.25, None) is x


def test_image_cache_refuses_a_convnext_with_drop_path_through_the_contract():
    ok = {"freeze_vision": True, "train_crop": "center", "hflip": False, "dropout": True, "freeze_bn_stats": False}
    config = TimmConvNeXtConfig.tiny()
    tower = nnx.eval_shape(lambda: TimmConvNeXt(config, rngs=nnx.Rngs(0)))

    def model(vision_config):
        return SimpleNamespace(config=SimpleNamespace(vision_config=vision_config), vision_model=tower)

    assert "drop path" in why_not_cacheable(model(config.replace(drop_path_rate=0.1)), **ok)
    assert why_not_cacheable(model(config.replace(drop_path_rate=0.1)), **{**ok, "dropout": False}) is None
    assert why_not_cacheable(model(config), **ok) is None  # no BatchNorm: no --freeze_bn_stats needed
    from_flag = parse_tower_config("timm_convnext.tiny:drop_path_rate=0.1", "vision", "--vision_config")
    assert from_flag == config.replace(drop_path_rate=0.1) and from_flag.stochastic


@pytest.mark.parametrize("architecture,count", [
    ("convnext_tiny", None),  # tests/golden/param_counts.json
    ("convnext_atto", 3_374_520), ("convnext_nano", 14_952_560)])
def test_full_size_builds_abstractly_with_timms_parameter_count(architecture, count):
    """timm.create_model(name, num_classes=0) parameter counts (the head's norm included, its fc not)."""
    if count is None:
        count = json.loads((GOLDEN / "param_counts.json").read_text())[f"timm {architecture} num_classes=0"]["total"]
    config = registry.vision_config_from_timm(architecture)
    abstract = nnx.eval_shape(lambda: registry.build_tower(config, dtype=jnp.float32, remat=False,
                                                           rngs=nnx.Rngs(0)))
    assert sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))) == count


def test_options_convnext_does_not_build_are_refused_by_name():
    with pytest.raises(registry.UnsupportedOptionError, match=r"'head_hidden_size': 64.*convnext_tiny"):
        registry.vision_config_from_timm("convnext_tiny", head_hidden_size=64)
    with pytest.raises(registry.UnsupportedOptionError, match=r"'use_grn': True"):
        registry.vision_config_from_timm("convnext_tiny", use_grn=True)
    with pytest.raises(registry.UnsupportedOptionError, match=r"\['layer_scale'\]"):
        registry.vision_config_from_timm("convnext_tiny", layer_scale=1.0)
    with pytest.raises(registry.UnknownArchitectureError, match=r"'convnext_tiny_hnf'.*convnext_atto"):
        registry.vision_config_from_timm("convnext_tiny_hnf")
    no_scale = TimmConvNeXtConfig.tiny().replace(ls_init_value=None)  # timm's ConvNeXt(ls_init_value=None)
    assert not any(r.hf.endswith("gamma") for r in timm_rules(no_scale))
    assert registry.vision_config_from_timm("convnext_tiny", ls_init_value=None).ls_init_value == 1e-6  # as timm


def _open_clip_cfg(**vision: object) -> dict:
    """open_clip's own convnext_* configs (timm_pool "", timm_drop_path 0.1), the trunk shrunk."""
    return {"embed_dim": 16,
            "vision_cfg": {"timm_model_name": "convnext_tiny", "timm_model_pretrained": False, "timm_pool": "",
                           "timm_proj": "linear", "timm_drop": 0.0, "timm_drop_path": 0.1, "image_size": 64,
                           "timm_model_kwargs": {"depths": [1, 2, 1, 1], "dims": [8, 16, 24, 32]}, **vision},
            "text_cfg": {"context_length": 16, "vocab_size": 99, "width": 32, "heads": 4, "layers": 2}}


def test_open_clip_convnext_config_builds_with_its_drop_path_and_round_trips(tmp_path):
    config = config_from_open_clip(_open_clip_cfg())
    assert config.vision_config == TimmConvNeXtConfig.tiny().replace(drop_path_rate=0.1)
    model = FlaxHybridCLIP(config, rngs=nnx.Rngs(3))
    out = model.save_open_clip(tmp_path / "oc")
    keys = set(load_file(out / "open_clip_model.safetensors"))
    assert {"visual.trunk.stem.0.weight", "visual.trunk.stages.1.downsample.1.weight",
            "visual.trunk.stages.0.blocks.0.gamma", "visual.trunk.head.norm.weight", "visual.head.proj.weight"} <= keys
    again = FlaxHybridCLIP.from_pretrained(out)
    assert again.config.vision_config == config.vision_config
    ids = jnp.asarray(np.array([[97, 5, 6, 98], [97, 7, 98, 0]]))
    px = _nhwc(_io("timm_convnext_tiny"))
    np.testing.assert_allclose(np.asarray(model(ids, px).logits_per_image),
                               np.asarray(again(ids, px).logits_per_image), atol=1e-6)
    with pytest.raises(OpenCLIPConfigError, match="timm_drop_path.*drop_path_rate"):
        config_from_open_clip(_open_clip_cfg(timm_model_name="resnet50",
                                             timm_model_kwargs={"layers": [1, 1, 1, 1]}))


def test_open_clip_convnext_folder_matches_open_clip_and_exports_its_state_dict(tmp_path):
    """open_clip's own CLIP with a ConvNeXt TimmModel trunk (tests/golden/openclip_convnext: timm_pool "",
    timm_drop_path 0.1): image and text features and logits as open_clip's; our export holds exactly its keys
    and values, and its model config."""
    folder = GOLDEN / "openclip_convnext"
    model = FlaxHybridCLIP.from_pretrained(folder)
    assert model.config.vision_config == TimmConvNeXtConfig.tiny().replace(drop_path_rate=0.1)
    io = _io("openclip_convnext")
    px, ids = _nhwc(io), jnp.asarray(io["input_ids"])
    ours = {"image_features": model.get_image_features(px),
            "text_features": model.get_text_features(ids, jnp.asarray(io["attention_mask"])),
            "logits_per_image": model(ids, px, jnp.asarray(io["attention_mask"])).logits_per_image}
    for name, value in ours.items():
        err = _max_err(value, io[name])
        assert err < ATOL * (10 if name == "logits_per_image" else 1), f"{name}: max abs error {err:.2e}"
    out = model.save_open_clip(tmp_path / "export")
    reference, exported = load_file(folder / "open_clip_model.safetensors"), load_file(out / "open_clip_model.safetensors")
    assert set(exported) == set(reference)
    assert all(np.array_equal(exported[k], reference[k]) for k in reference)
    written = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]
    assert written == json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
