"""Run with 8 simulated CPU devices (XLA_FLAGS set by the caller): the same global batch through the train
step on a 1-device mesh and on the 8-device mesh; prints JSON with the largest differences."""

from __future__ import annotations

import dataclasses
import json
import sys

import jax
import numpy as np
from flax import nnx

from medclip import FlaxHybridCLIP, HybridCLIPConfig
from medclip.models import BertConfig, HeadConfig, TimmViTConfig
from medclip.models import conv as conv_layers
from medclip.models.modified_resnet import ModifiedResNetConfig
from medclip.models.packing import plan_packing
from medclip.training import mesh as mesh_lib
from medclip.training.optim import OptimizerConfig, make_optimizer
from medclip.training.step import StepConfig, init_state, make_train_step


def family_config(family: str) -> HybridCLIPConfig:
    """The default dual encoder (CLIP ViT + BERT), a whole CLIP, or BiomedCLIP's architecture (timm ViT + BERT
    with the [CLS] pooler and an MLP head)."""
    if family == "clip":
        tiny = HybridCLIPConfig.tiny("clip_text_model")
    elif family == "modified_resnet":  # BatchNorm: the global batch's statistics on any number of devices
        tiny = HybridCLIPConfig(vision_config=ModifiedResNetConfig(layers=(1, 1, 1, 1), width=8, heads=4,
                                                                   output_dim=16, image_size=32),
                                text_config=BertConfig.tiny(), projection_dim=16, vision_head=HeadConfig(type="none"))
        return tiny.replace(text_config=tiny.text_config.replace(num_hidden_layers=1))
    elif family == "biomedclip":
        tiny = HybridCLIPConfig(vision_config=TimmViTConfig.tiny(), text_config=BertConfig.tiny(), projection_dim=16,
                                text_head=HeadConfig(type="mlp", hidden_size=24, hidden_bias=False, pooler="cls"))
    else:
        tiny = HybridCLIPConfig.tiny()
    return dataclasses.replace(tiny, vision_config=tiny.vision_config.replace(num_hidden_layers=1),
                               text_config=tiny.text_config.replace(num_hidden_layers=1))


def run(devices, fully_sharded: bool, batches, dropout: bool = True, packed: bool = False, family: str = "bert",
        config: HybridCLIPConfig | None = None, step_config: StepConfig | None = None):
    """`config` replaces the family's model; `step_config` the step's (its dropout and mesh are this run's)."""
    config = config or family_config(family)
    model = FlaxHybridCLIP(config, rngs=nnx.Rngs(0))
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
    tx, _ = make_optimizer(params, OptimizerConfig(learning_rate=1e-3, total_steps=10, schedule="constant"))
    mesh = mesh_lib.make_mesh(devices)
    abstract = jax.eval_shape(lambda p, s: init_state(p, tx, 0, s), params, stats)
    shardings = mesh_lib.state_shardings(mesh, abstract, fully_sharded)
    state = jax.jit(lambda p, s: init_state(p, tx, 0, s), out_shardings=shardings)(params, stats)
    steps = {}  # one jitted step per packing plan, as the trainer keeps them
    losses, norms = [], []
    for batch in batches:
        plan = plan_packing(batch["attention_mask"], groups=len(devices)) if packed else None
        assert plan is not None or not packed, "the packed case needs batches with padding"
        if plan not in steps:
            step_config = dataclasses.replace(step_config or StepConfig(), dropout=dropout, mesh=mesh)
            steps[plan] = jax.jit(make_train_step(graphdef, tx, step_config, plan),
                                  in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                                  out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=0)
        state, metrics = steps[plan](state, mesh_lib.global_batch(mesh, batch))
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
    return losses, norms, jax.device_get({"params": state.params, "batch_stats": state.batch_stats})


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    family = sys.argv[1] if len(sys.argv) > 1 else "bert"
    # the CPU kernel gradient of a convolution runs over batch slices; a tiny tower would fit in one, so force
    # the most slices: every k-th example of a batch sharded over the mesh
    conv_layers._CPU_SLICE_ELEMENTS = 1
    rng = np.random.default_rng(0)
    batches = [{"input_ids": rng.integers(2, 90, size=(16, 12)).astype(np.int32),
                "attention_mask": np.ones((16, 12), np.int32),
                "pixel_values": rng.normal(size=(16, 32, 32, 3)).astype(np.float32)} for _ in range(2)]
    if family != "bert":  # a new family: replicated parameters against one device
        for b in batches:
            b["input_ids"][:, -1] = 98  # CLIP text pools at its end-of-text token
        one = run(jax.devices()[:1], False, batches, family=family)
        report = {"replicated": _diffs(one, run(jax.devices(), False, batches, family=family)), "losses": one[0],
                  "grad_norms": one[1]}
        json.dump(report, sys.stdout)
        return
    one = run(jax.devices()[:1], False, batches)
    report = {name: _diffs(one, run(jax.devices(), fully, batches))
              for name, fully in (("replicated", False), ("fully_sharded", True))}
    report["losses"] = one[0]
    # Text packing (each device packs its own rows) against the padded layout on one device; ragged
    # captions, no dropout (its masks follow the layout's shape).
    ragged = [{**b, "attention_mask": (np.arange(12)[None] < rng.integers(2, 9, size=(16, 1))).astype(np.int32)}
              for b in batches]
    report["packed"] = _diffs(run(jax.devices()[:1], False, ragged, dropout=False),
                              run(jax.devices(), False, ragged, dropout=False, packed=True))
    json.dump(report, sys.stdout)


def _diffs(a, b) -> dict[str, float]:
    return {"loss_diff": max(abs(x - y) for x, y in zip(a[0], b[0])),
            "grad_norm_diff": max(abs(x - y) for x, y in zip(a[1], b[1])),
            "param_diff": max(float(np.abs(x - y).max()) for (path, x), y in zip(
                jax.tree_util.tree_leaves_with_path(a[2]), jax.tree.leaves(b[2])) if not has_zero_gradient(path))}


def has_zero_gradient(path) -> bool:
    """The key bias: it adds the same q.b_k to every score of a query, which the softmax cancels, so its
    true gradient is 0 and Adam's g / sqrt(v) turns rounding noise into updates of up to lr. `path` is a
    parameter tree path (our names) or an exported checkpoint key (transformers' names)."""
    if isinstance(path, str):
        return path.endswith(("k_proj.bias", "attention.self.key.bias"))
    return jax.tree_util.keystr(path).endswith("['k_proj']['bias']")


if __name__ == "__main__":
    main()
