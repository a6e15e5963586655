"""Starting JAX's multi-controller runtime when this process is one of several.

On TPU pod slices `jax.distributed.initialize()` finds everything itself; on SLURM it reads the SLURM
variables; elsewhere the coordinator address, process count and id come from flags or JAX_* variables.
A process launched alone does nothing here and behaves exactly as before.
"""

from __future__ import annotations

import itertools
import logging
import os

import jax

logger = logging.getLogger(__name__)


def _int_env(*names: str) -> int | None:
    for name in names:
        if os.environ.get(name):
            return int(os.environ[name])
    return None


def launched_as_multi_process(coordinator_address: str | None, num_processes: int | None) -> bool:
    if coordinator_address or (num_processes or 0) > 1:
        return True
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if (_int_env("SLURM_NTASKS") or 1) > 1:
        return True
    if os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","):  # a multi-host TPU slice on GKE
        return True
    return _on_cloud_tpu_vm()  # GCE TPU VMs: JAX finds its peers through the metadata server


def _on_cloud_tpu_vm() -> bool:
    """JAX's own check; initialising on a single-host TPU VM is harmless (one process)."""
    try:
        from jax._src.clusters.cloud_tpu_cluster import running_in_cloud_tpu_vm
    except ImportError:
        return False
    return bool(running_in_cloud_tpu_vm)


def maybe_initialize(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
    """Initialises `jax.distributed` if launched as one of several processes; returns whether it did."""
    if not launched_as_multi_process(coordinator_address, num_processes):
        return False
    kwargs = {}
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        kwargs["coordinator_address"] = address
        count = num_processes if num_processes is not None else _int_env("JAX_NUM_PROCESSES")
        pid = process_id if process_id is not None else _int_env("JAX_PROCESS_ID")
        if count is not None:
            kwargs["num_processes"] = count
        if pid is not None:
            kwargs["process_id"] = pid
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":  # CPU processes need a collectives backend
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    logger.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
                jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


BARRIER_TIMEOUT_S = 600
_barrier_ids = itertools.count()


def barrier(name: str, timeout_s: int = BARRIER_TIMEOUT_S) -> None:
    """Waits until every process gets here, through the coordination service.

    Not `multihost_utils.sync_global_devices`: on CPU that is a gloo collective whose rendezvous times out
    after 30 s, and processes can drift further apart than that (one writes an export, or the machine is
    loaded). Collectives after a barrier start together. A no-op in a single process.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialised but there are several processes")
    client.wait_at_barrier(f"medclip:{next(_barrier_ids)}:{name}", timeout_s * 1000)
