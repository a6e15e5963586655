"""The device mesh and how arrays are laid out on it.

Data parallelism is `jax.jit` over a 1-D `Mesh` with axis `data`: batches are split on it, parameters are
replicated (or, for large towers, sharded on it as well: FSDP-style, XLA gathers them per layer).
Multi-host works the same: each process passes its local rows to `make_array_from_process_local_data`.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: list | None = None) -> Mesh:
    devices = devices if devices is not None else jax.devices()
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def describe(mesh: Mesh) -> str:
    """What the run trains on, logged at start so a TPU/GPU user sees the accelerator was found:
    `8 x TPU v5 lite (tpu), 1 process` (CPU: `1 x cpu (cpu), 1 process`)."""
    kinds: dict[str, int] = {}
    for device in mesh.devices.flat:
        name = f"{device.device_kind} ({device.platform})"
        kinds[name] = kinds.get(name, 0) + 1
    processes = jax.process_count()
    return ", ".join(f"{n} x {kind}" for kind, n in kinds.items()) + f", {processes} process" + (
        "es" if processes > 1 else "")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], axis_size: int, min_size: int = 2 ** 14) -> P:
    """Shards the largest dimension divisible by the mesh size; small arrays stay replicated."""
    if int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % axis_size == 0:
            spec = [None] * len(shape)
            spec[dim] = DATA_AXIS
            return P(*spec)
    return P()


def state_shardings(mesh: Mesh, state: Any, fully_sharded: bool) -> Any:
    """Shardings for a pytree of arrays (or ShapeDtypeStructs): replicated, or FSDP-style."""
    size = mesh.shape[DATA_AXIS]

    def one(leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        return NamedSharding(mesh, fsdp_spec(shape, size) if fully_sharded else P())

    return jax.tree.map(one, state)


def global_batch(mesh: Mesh, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Process-local rows -> one global array per key, split on the data axis."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
