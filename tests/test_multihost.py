"""Two processes on 127.0.0.1 (jax.distributed, CPU with gloo collectives, 2 simulated devices each) against
one process with 4 devices: same global batch and seed, so the same losses and parameters; every example
seen exactly once per epoch; both processes killed and resumed continue exactly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.sharded_step_check import has_zero_gradient

ROOT = Path(__file__).resolve().parents[1]
TRAIN, STEPS_PER_EPOCH = 160, 5  # global batch 8 per device x 4 devices = 32
ARGS = ["--model_preset", "demo", "--synthetic_train_samples", str(TRAIN), "--synthetic_validation_samples", "40",
        "--synthetic_image_size", "32", "--max_seq_length", "24", "--do_train", "--do_eval", "--num_train_epochs", "2",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--learning_rate", "1e-3",
        "--save_steps", "1", "--logging_steps", "1", "--report_to", "none", "--seed", "5", "--log_data_order"]


def _env(devices: int) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
            "PYTHONUNBUFFERED": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_pair(out: Path, log: Path) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for pid in range(2):
        with log.with_suffix(f".{pid}.log").open("a") as f:
            procs.append(subprocess.Popen(
                [sys.executable, "run_hybrid_clip.py", "--output_dir", str(out), *ARGS,
                 "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(pid)],
                cwd=ROOT, env=_env(2), stdout=f, stderr=subprocess.STDOUT))
    return procs


def _wait(procs, log: Path) -> None:
    for pid, proc in enumerate(procs):
        code = proc.wait(timeout=900)
        assert code == 0, log.with_suffix(f".{pid}.log").read_text()[-4000:]


def _metrics(out: Path) -> tuple[list[float], list[dict]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r], [r for r in rows if "eval_loss" in r]


def _order(out: Path, process: int) -> dict[int, list[str]]:
    lines = (out / f"data_order.process{process}.jsonl").read_text().splitlines()
    return {r["step"]: r["ids"] for r in map(json.loads, lines)}


def _latest_step(out: Path) -> int:
    folder = out / "checkpoints"
    return max([int(p.name) for p in folder.iterdir() if p.name.isdigit()], default=0) if folder.is_dir() else 0


@pytest.mark.heavy
def test_two_processes_match_one_and_resume_exactly(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    with (tmp_path / "single.log").open("w") as log:  # the one-process run goes beside the pair
        proc = subprocess.Popen([sys.executable, "run_hybrid_clip.py", "--output_dir", str(single), *ARGS], cwd=ROOT,
                                env=_env(4), stdout=log, stderr=subprocess.STDOUT)
    _wait(_launch_pair(multi, tmp_path / "multi"), tmp_path / "multi")
    assert proc.wait(timeout=900) == 0, (tmp_path / "single.log").read_text()[-4000:]

    # Same losses, evaluation and parameters as one process on the same global batches.
    single_loss, single_eval = _metrics(single)
    multi_loss, multi_eval = _metrics(multi)
    assert len(multi_loss) == 2 * STEPS_PER_EPOCH
    np.testing.assert_allclose(multi_loss, single_loss, rtol=1e-5, atol=1e-5)
    assert [e["eval_examples"] for e in multi_eval] == [40, 40]  # gathered from both processes, padding excluded
    for a, b in zip(single_eval, multi_eval):
        assert abs(a["eval_loss"] - b["eval_loss"]) < 1e-4 and a["eval_t2i_R@5"] == b["eval_t2i_R@5"]
    single_w, multi_w = load_file(str(single / "model.safetensors")), load_file(str(multi / "model.safetensors"))
    for key in single_w:
        if has_zero_gradient(key):
            continue
        np.testing.assert_allclose(multi_w[key], single_w[key], atol=1e-4, err_msg=key)
    assert not (multi / "metrics.jsonl.1").exists() and len(list(multi.glob("data_report.json"))) == 1

    # Each process reads only its own shard: disjoint, together every example once per epoch.
    p0, p1, one = _order(multi, 0), _order(multi, 1), _order(single, 0)
    for epoch in range(2):
        steps = range(epoch * STEPS_PER_EPOCH + 1, (epoch + 1) * STEPS_PER_EPOCH + 1)
        seen0 = [i for s in steps for i in p0[s]]
        seen1 = [i for s in steps for i in p1[s]]
        assert not set(seen0) & set(seen1)
        assert sorted(seen0 + seen1) == sorted(set(seen0 + seen1)) and len(seen0 + seen1) == TRAIN
        for s in steps:
            assert sorted(p0[s] + p1[s]) == sorted(one[s])

    # Kill both processes mid-run, relaunch both: the run continues exactly.
    killed = tmp_path / "killed"
    procs = _launch_pair(killed, tmp_path / "killed")
    deadline = time.time() + 600
    while _latest_step(killed) < 4 and all(p.poll() is None for p in procs):
        assert time.time() < deadline
        time.sleep(0.05)
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert _latest_step(killed) < 2 * STEPS_PER_EPOCH, "finished before it was killed"
    _wait(_launch_pair(killed, tmp_path / "killed"), tmp_path / "killed")
    assert "resumed from step" in (tmp_path / "killed.0.log").read_text()
    resumed = load_file(str(killed / "model.safetensors"))
    for key in multi_w:
        np.testing.assert_array_equal(resumed[key], multi_w[key], err_msg=key)
    assert _metrics(killed)[0] == multi_loss
