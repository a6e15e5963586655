"""Benchmark: memory of one medsiglip training step (the full MedSigLIP-448 architecture, 1,024 image tokens,
64 text tokens) on CPU, from XLA's compiled memory_analysis, without materialising any weight.

    .venv/bin/python benchmarks/medsiglip_memory.py                      # depths 1,2 per tower, batch 1 and 2
    .venv/bin/python benchmarks/medsiglip_memory.py --depths 27 --remat true,false

The model, its optimizer state and the batch are abstract (jax.eval_shape): the step is lowered and compiled for
their shapes only, so the full-size figures need no 3.5 GB of weights, only the compile. Per batch size and depth
(layers in each tower; 27 is MedSigLIP's): arguments (parameters + AdamW moments + batch, held across steps),
temporaries (activations, gradients, XLA's scratch: what a step adds), and the memory per example, the difference
of temporaries between batch 2 and batch 1. The step is the recipe's: sigmoid loss, AdamW with its decay mask,
gradient clipping, fp32 on CPU (--dtype auto), --remat as given.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import jax
import jax.numpy as jnp
from flax import nnx

from medclip import FlaxHybridCLIP
from medclip.models.hybrid import HybridCLIPConfig
from medclip.models.siglip_text import SiglipTextConfig
from medclip.models.siglip_vision import SiglipVisionConfig
from medclip.training.losses import LossConfig
from medclip.training.optim import OptimizerConfig, make_optimizer
from medclip.training.step import StepConfig, init_state, make_train_step

GIB = 2 ** 30


def medsiglip_config(depth: int) -> HybridCLIPConfig:
    vision = SiglipVisionConfig.medsiglip_448().replace(num_hidden_layers=depth)
    text = SiglipTextConfig.medsiglip_448().replace(num_hidden_layers=depth)
    return HybridCLIPConfig.from_dict({"model_type": "siglip", "vision_config": vision.to_hf_dict(),
                                       "text_config": text.to_hf_dict()})


def measure(depth: int, batch: int, remat: bool) -> dict:
    config = medsiglip_config(depth)
    abstract = nnx.eval_shape(lambda: FlaxHybridCLIP(config, remat=remat, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract, nnx.Param)
    params = nnx.to_pure_dict(params)
    tx, _ = make_optimizer(params, OptimizerConfig(learning_rate=1e-4, warmup_steps=5, total_steps=1000,
                                                   schedule="cosine", weight_decay=0.01, weight_decay_mask="ndim",
                                                   max_grad_norm=1.0, gradient_accumulation_steps=8))
    state = jax.eval_shape(lambda p: init_state(p, tx, 0), params)
    side = config.vision_config.image_size
    length = config.text_config.max_position_embeddings
    batch_shapes = {"input_ids": jax.ShapeDtypeStruct((batch, length), jnp.int32),
                    "attention_mask": jax.ShapeDtypeStruct((batch, length), jnp.int32),
                    "pixel_values": jax.ShapeDtypeStruct((batch, side, side, 3), jnp.float32)}
    step = make_train_step(graphdef, tx, StepConfig(loss=LossConfig(name="sigmoid")))
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, batch_shapes).compile()
    memory = compiled.memory_analysis()
    count = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
    return {"depth": depth, "batch": batch, "remat": remat, "parameters": count,
            "argument_gib": memory.argument_size_in_bytes / GIB, "temp_gib": memory.temp_size_in_bytes / GIB,
            "output_gib": memory.output_size_in_bytes / GIB, "compile_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="1,2")
    parser.add_argument("--batches", default="1,2")
    parser.add_argument("--remat", default="true", help="comma list of true/false")
    args = parser.parse_args()
    print("| layers per tower | remat | batch | parameters | arguments GiB | temporaries GiB | compile s |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for remat in (r.strip().lower() == "true" for r in args.remat.split(",")):
        for depth in (int(d) for d in args.depths.split(",")):
            for batch in (int(b) for b in args.batches.split(",")):
                r = measure(depth, batch, remat)
                rows.append(r)
                print(f"| {depth} | {remat} | {batch} | {r['parameters'] / 1e6:.1f} M | {r['argument_gib']:.3f} | "
                      f"{r['temp_gib']:.3f} | {r['compile_s']:.0f} |", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
