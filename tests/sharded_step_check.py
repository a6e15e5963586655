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
from medclip.training import mesh as mesh_lib
from medclip.training.optim import OptimizerConfig, make_optimizer
from medclip.training.step import StepConfig, init_state, make_train_step


def run(devices, fully_sharded: bool, batches):
    tiny = HybridCLIPConfig.tiny()
    config = dataclasses.replace(tiny, vision_config=tiny.vision_config.replace(num_hidden_layers=1),
                                 text_config=tiny.text_config.replace(num_hidden_layers=1))
    model = FlaxHybridCLIP(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    tx, _ = make_optimizer(params, OptimizerConfig(learning_rate=1e-3, total_steps=10, schedule="constant"))
    mesh = mesh_lib.make_mesh(devices)
    abstract = jax.eval_shape(lambda p: init_state(p, tx, 0), params)
    shardings = mesh_lib.state_shardings(mesh, abstract, fully_sharded)
    state = jax.jit(lambda p: init_state(p, tx, 0), out_shardings=shardings)(params)
    step = jax.jit(make_train_step(graphdef, tx, StepConfig(dropout=True)),
                   in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                   out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=0)
    losses, norms = [], []
    for batch in batches:
        state, metrics = step(state, mesh_lib.global_batch(mesh, batch))
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
    return losses, norms, jax.device_get(state.params)


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    batches = [{"input_ids": rng.integers(2, 90, size=(16, 12)).astype(np.int32),
                "attention_mask": np.ones((16, 12), np.int32),
                "pixel_values": rng.normal(size=(16, 32, 32, 3)).astype(np.float32)} for _ in range(2)]
    one = run(jax.devices()[:1], False, batches)
    report = {}
    for name, fully in (("replicated", False), ("fully_sharded", True)):
        eight = run(jax.devices(), fully, batches)
        report[name] = {
            "loss_diff": max(abs(a - b) for a, b in zip(one[0], eight[0])),
            "grad_norm_diff": max(abs(a - b) for a, b in zip(one[1], eight[1])),
            "param_diff": max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(one[2]),
                                                                           jax.tree.leaves(eight[2]))),
        }
    report["losses"] = one[0]
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
