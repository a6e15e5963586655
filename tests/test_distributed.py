"""When run_hybrid_clip.py starts jax.distributed: only when launched as one of several processes."""

from __future__ import annotations

import pytest

from medclip.training import distributed


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: False)


def test_alone_does_nothing():
    assert not distributed.launched_as_multi_process(None, None)
    assert distributed.maybe_initialize() is False


@pytest.mark.parametrize("env", [{"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, {"SLURM_NTASKS": "4"},
                                 {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}])
def test_cluster_environments_are_detected(monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert distributed.launched_as_multi_process(None, None)


def test_single_task_slurm_job_runs_alone(monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert not distributed.launched_as_multi_process(None, None)


def test_flags_say_multi_process():
    assert distributed.launched_as_multi_process("127.0.0.1:1234", None)
    assert distributed.launched_as_multi_process(None, 2)


def test_barrier_is_a_no_op_alone():
    distributed.barrier("nothing to wait for")
