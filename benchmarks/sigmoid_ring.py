"""Benchmark: the sigmoid loss and its gradient over 8 simulated devices, the ring form (`--sigmoid_form ring`,
medclip.training.sigmoid_ring) against the all-gathered one (`--sigmoid_form gathered`), at several global batches.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python benchmarks/sigmoid_ring.py
    ... benchmarks/sigmoid_ring.py --batches 256,1024,4096 --dim 1152 --repeats 5

Per global batch and form: the compiled program's memory per device (XLA's memory_analysis: temporaries, the
peak beside the inputs and outputs) and the wall time of one loss-and-gradient call (best of --repeats). The
embeddings come in split over the mesh as the towers leave them; only the loss stage is measured (the towers
cost the same in both forms). Simulated CPU devices share the host's cores and memory, so the time says what
the extra hops cost here, not on a TPU/GPU interconnect; the memory is what each real device would hold.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from medclip.training import mesh as mesh_lib
from medclip.training.losses import sigmoid_loss
from medclip.training.sigmoid_ring import sigmoid_loss_ring


def gathered(image, text, scale, bias):
    return sigmoid_loss(text @ image.T * scale + bias)


def measure(form: str, batch: int, dim: int, repeats: int, mesh) -> dict:
    rng = np.random.default_rng(0)
    sharding = mesh_lib.batch_sharding(mesh)
    image, text = (jax.device_put(rng.normal(size=(batch, dim)).astype(np.float32) / np.sqrt(dim), sharding)
                   for _ in range(2))
    scale, bias = jnp.float32(10.0), jnp.float32(-10.0)
    loss = gathered if form == "gathered" else (lambda *a: sigmoid_loss_ring(*a, mesh)[0])
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)),
                 out_shardings=(mesh_lib.replicated(mesh), (sharding, sharding, mesh_lib.replicated(mesh),
                                                           mesh_lib.replicated(mesh))))
    compiled = fn.lower(image, text, scale, bias).compile()
    memory = compiled.memory_analysis()
    jax.block_until_ready(compiled(image, text, scale, bias))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(image, text, scale, bias))
        best = min(best, time.perf_counter() - start)
    return {"form": form, "global_batch": batch, "dim": dim, "devices": mesh.size,
            "temp_mib": memory.temp_size_in_bytes / 2 ** 20,
            "argument_mib": memory.argument_size_in_bytes / 2 ** 20,
            "output_mib": memory.output_size_in_bytes / 2 ** 20, "ms": best * 1e3,
            "loss": float(compiled(image, text, scale, bias)[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="256,1024,4096")
    parser.add_argument("--dim", type=int, default=1152)  # MedSigLIP's embedding width
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    mesh = mesh_lib.make_mesh()
    if mesh.size == 1:
        print("one device: set XLA_FLAGS=--xla_force_host_platform_device_count=8 to simulate 8")
    print(f"{mesh.size} devices ({os.cpu_count()} cores), dim {args.dim}")
    print("| global batch | form | temp MiB / device | args MiB | step ms | loss |")
    print("|---|---|---|---|---|---|")
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for form in ("gathered", "ring"):
            r = measure(form, batch, args.dim, args.repeats, mesh)
            rows.append(r)
            print(f"| {batch} | {form} | {r['temp_mib']:.2f} | {r['argument_mib']:.2f} | {r['ms']:.1f} | "
                  f"{r['loss']:.4f} |", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
