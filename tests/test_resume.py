"""SIGKILL at random moments (saves happen every step, so kills land during saves too), resume, and end
with exactly the parameters of a run that was never interrupted."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import numpy as np

from tests import killable_run

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--model_preset", "demo", "--synthetic_train_samples", "192", "--synthetic_validation_samples", "32",
        "--synthetic_image_size", "32", "--max_seq_length", "24", "--do_train", "--num_train_epochs", "2",
        "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "32", "--learning_rate", "1e-3",
        "--save_steps", "1", "--logging_steps", "1", "--report_to", "none", "--seed", "3"]


def _start(output_dir: Path, log: Path):
    return killable_run.start(output_dir, log, ARGS)


def _finish(output_dir: Path, log: Path):
    return killable_run.finish(output_dir, log, ARGS)


def test_sigkill_anywhere_then_resume_gives_identical_parameters(tmp_path):
    reference = _finish(tmp_path / "reference", tmp_path / "reference.log")

    interrupted, log = tmp_path / "interrupted", tmp_path / "interrupted.log"
    rng = random.Random(0)
    kills = 0
    for round_ in range(2):
        proc = _start(interrupted, log)
        seen = killable_run.latest_saved_step(interrupted)
        deadline = time.time() + 300
        while killable_run.latest_saved_step(interrupted) < min(seen + 2 + round_ * 3, 10) and proc.poll() is None:
            assert time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
    assert kills == 2, "the run finished before it could be killed; slow it down or kill earlier"
    assert "resumed from step" in log.read_text()
    resumed = _finish(interrupted, log)

    assert reference.keys() == resumed.keys()
    for key in reference:
        np.testing.assert_array_equal(resumed[key], reference[key], err_msg=key)
