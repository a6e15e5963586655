"""OpenAI CLIP's ModifiedResNet (RN50; PMC-CLIP's image tower) against open_clip through golden fixtures, and
BatchNorm running statistics: updated like PyTorch's in training, frozen on request, never weight-decayed."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from medclip import FlaxHybridCLIP
from medclip.checkpoints import conversion
from medclip.checkpoints.assembly import fill, param_shapes
from medclip.checkpoints.openclip import config_from_open_clip
from medclip.models.modified_resnet import ModifiedResNet, ModifiedResNetConfig, conversion_rules
from medclip.training.optim import decay_mask
from tests.golden.numpy_weights import load_fixture_weights

GOLDEN = Path(__file__).parent / "golden"


def _io(name: str) -> dict[str, np.ndarray]:
    return dict(np.load(GOLDEN / name / "io.npz"))


def _err(ours, reference) -> float:
    return float(np.abs(np.asarray(ours) - reference).max())


def test_open_clip_rn_model_matches_open_clip():
    model = FlaxHybridCLIP.from_pretrained(GOLDEN / "modified_resnet")
    assert model.config.vision_head.type == "none" and model.config.vision_config.heads == 4
    io = _io("modified_resnet")
    px = jnp.asarray(io["pixel_values"].transpose(0, 2, 3, 1))
    ids, mask = jnp.asarray(io["input_ids"]), jnp.asarray(io["attention_mask"])
    assert _err(model.get_image_features(px), io["image_features"]) < 1e-4
    assert _err(model.get_text_features(ids, mask), io["text_features"]) < 1e-4
    assert _err(model(ids, px, mask).logits_per_image, io["logits_per_image"]) < 1e-4


def test_train_mode_updates_running_statistics_like_pytorch():
    """One train-mode forward: batch statistics normalise, and the running mean / variance (unbiased, momentum
    0.1) end where torch's do."""
    model = FlaxHybridCLIP.from_pretrained(GOLDEN / "modified_resnet")
    io = _io("modified_resnet")
    features = model.get_image_features(jnp.asarray(io["pixel_values"].transpose(0, 2, 3, 1)), train=True)
    assert _err(features, io["image_features_train_mode"]) < 1e-4
    expected = load_file(GOLDEN / "modified_resnet" / "bn_after_train_step.safetensors")
    ours = conversion.to_hf(_batch_stats(model), _rules_of(model))
    stats = {k: v for k, v in expected.items() if k.endswith(("running_mean", "running_var"))}
    assert len(stats) > 20
    for key, value in stats.items():
        assert _err(ours[key], value) < 1e-5, key


def _batch_stats(model) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.BatchStat))}


def _rules_of(model):
    from medclip.checkpoints.openclip import openclip_rules

    return openclip_rules(model.config)


def test_full_size_rn50_matches_open_clip():
    """OpenAI RN50's ModifiedResNet ([3, 4, 6, 3], width 64, 32 heads, 224 px) with regenerated weights."""
    folder = GOLDEN / "modified_resnet_rn50_full"
    config = ModifiedResNetConfig.rn50()
    tower = nnx.eval_shape(lambda: ModifiedResNet(config, rngs=nnx.Rngs(0)))
    values = conversion.to_ours(load_fixture_weights(folder), conversion_rules(config, "openclip"), param_shapes(tower),
                          source=str(folder))
    tower = fill(tower, values)
    io = _io("modified_resnet_rn50_full")
    _, pooled = tower(jnp.asarray(io["pixel_values"].transpose(0, 2, 3, 1)))
    assert _err(pooled, io["image_features"]) < 1e-4


def test_full_size_rn50_clip_has_the_published_parameter_count():
    import json

    counts = json.loads((GOLDEN / "param_counts.json").read_text())["open_clip RN50"]
    config = config_from_open_clip({"embed_dim": 1024,
                                    "vision_cfg": {"image_size": 224, "layers": [3, 4, 6, 3], "width": 64},
                                    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512,
                                                 "heads": 8, "layers": 12}})
    model = nnx.eval_shape(lambda: FlaxHybridCLIP(config, rngs=nnx.Rngs(0)))
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))  # torch's parameters(): running statistics excluded
    assert sum(int(np.prod(v.shape)) for _, v in params) == counts["total"]
    assert sum(int(np.prod(v.shape)) for p, v in params if p[0] == "vision_model") == counts["visual"]


def test_running_statistics_are_saved_and_loaded_and_no_norm_is_decayed(tmp_path):
    model = FlaxHybridCLIP.from_pretrained(GOLDEN / "modified_resnet")
    model.get_image_features(jnp.ones((2, 64, 64, 3)), train=True)  # moves the statistics off the checkpoint's
    model.save_pretrained(tmp_path / "m")
    again = FlaxHybridCLIP.from_pretrained(tmp_path / "m")
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.BatchStat)),
                                 nnx.to_flat_state(nnx.state(again, nnx.BatchStat))):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))
    mask = decay_mask(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    flat = {jax.tree_util.keystr(p): d for p, d in jax.tree_util.tree_leaves_with_path(mask)}
    bn = [k for k in flat if "'bn" in k or "downsample_bn" in k]
    assert bn and not any(flat[k] for k in bn)  # BatchNorm scale and bias: never decayed
    assert flat["['vision_model']['conv1']['kernel']"]  # convolution kernels are


def _tiny_rn_model():
    from medclip import HybridCLIPConfig
    from medclip.models import BertConfig, HeadConfig

    config = HybridCLIPConfig(vision_config=ModifiedResNetConfig.tiny(), text_config=BertConfig.tiny(),
                              projection_dim=16, vision_head=HeadConfig(type="none"))
    return FlaxHybridCLIP(config, rngs=nnx.Rngs(0))


def _step_once(freeze_bn_stats: bool, pixels: np.ndarray):
    from medclip.training.optim import OptimizerConfig, make_optimizer
    from medclip.training.step import StepConfig, init_state, make_train_step

    graphdef, params, stats = nnx.split(_tiny_rn_model(), nnx.Param, nnx.BatchStat)
    params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
    tx, _ = make_optimizer(params, OptimizerConfig(learning_rate=1e-3, total_steps=2))
    state = init_state(params, tx, 0, stats)
    rng = np.random.default_rng(0)
    batch = {"input_ids": jnp.asarray(rng.integers(3, 90, (4, 8)), jnp.int32), "attention_mask": jnp.ones((4, 8), jnp.int32),
             "pixel_values": jnp.asarray(pixels, jnp.float32)}
    new, metrics = jax.jit(make_train_step(graphdef, tx, StepConfig(freeze_bn_stats=freeze_bn_stats)))(state, batch)
    return stats, jax.device_get(new.batch_stats), metrics


def _max_change(before, after) -> float:
    return max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
               zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_a_training_step_updates_statistics_unless_frozen_or_skipped():
    pixels = np.random.default_rng(1).normal(size=(4, 64, 64, 3))
    before, after, metrics = _step_once(False, pixels)
    assert bool(metrics["finite"]) and _max_change(before, after) > 1e-3
    before, after, _ = _step_once(True, pixels)  # --freeze_bn_stats: running statistics used and kept
    assert _max_change(before, after) == 0.0
    before, after, metrics = _step_once(False, np.full((4, 64, 64, 3), np.nan))  # skipped step: nothing moves
    assert not bool(metrics["finite"]) and _max_change(before, after) == 0.0
