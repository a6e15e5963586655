"""SIGKILL at random moments (saves happen every step, so kills land during saves too), resume, and end with
exactly the parameters, BatchNorm statistics and learning-rate schedule of a run that was never interrupted.

One run covers what resume must carry: a ModifiedResNet tower (running statistics are in the exported
model.safetensors as running_mean / running_var), ReduceLROnPlateau (its multiplier is in the optimizer state,
its counters in the checkpoint's progress), L2-style weight decay and parallel preprocessing. The demo preset's
ViT resumes exactly in tests/test_multihost.py and tests/test_text_cache.py."""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests import killable_run

# 96 pairs / 32 = 3 steps an epoch, 3 epochs. Patience 0 and a 50% relative threshold: epoch 2 cannot count
# as better, so the learning rate halves after epoch 2's evaluation and epoch 3 trains at the reduced rate.
ARGS = ["--synthetic_train_samples", "96", "--synthetic_validation_samples", "32",
        "--synthetic_image_size", "32", "--max_seq_length", "24", "--do_train", "--do_eval",
        "--num_train_epochs", "3", "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "32",
        "--learning_rate", "1e-3", "--lr_schedule", "constant", "--reduce_lr_on_plateau",
        "--plateau_patience", "0", "--plateau_threshold", "0.5", "--plateau_factor", "0.5",
        "--weight_decay", "0.1", "--weight_decay_type", "l2", "--preprocessing_num_workers", "2",
        "--save_steps", "1", "--logging_steps", "1", "--report_to", "none", "--seed", "5"]


@pytest.fixture
def run_args(tmp_path) -> list[str]:
    return ["--model_name_or_path", str(killable_run.tiny_model(tmp_path)), *ARGS]


def _learning_rates(output_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["learning_rate"]) for r in rows if "learning_rate" in r]


@pytest.mark.heavy
def test_sigkill_anywhere_then_resume_gives_identical_parameters_statistics_and_schedule(tmp_path, run_args):
    # The uninterrupted run goes beside the interrupted one: two processes keep both cores busy.
    reference_dir, reference_log = tmp_path / "reference", tmp_path / "reference.log"
    reference_proc = killable_run.start(reference_dir, reference_log, run_args)

    interrupted, log = tmp_path / "interrupted", tmp_path / "interrupted.log"
    rng = random.Random(0)
    # Killed mid epoch 2 (plateau state from epoch 1 in the checkpoint), then in epoch 3 (after the reduction),
    # each a random moment after that step's checkpoint began to appear.
    for kill_after in (4, 7):
        proc = killable_run.start(interrupted, log, run_args)
        deadline = time.time() + 600
        while killable_run.latest_saved_step(interrupted) < kill_after and proc.poll() is None:
            assert time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.3))
        assert proc.poll() is None, "the run ended before it could be killed:\n" + log.read_text()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert log.read_text().count("resumed from step") == 1
    resumed = killable_run.finish(interrupted, log, run_args)
    assert log.read_text().count("resumed from step") == 2

    assert reference_proc.wait(timeout=900) == 0, reference_log.read_text()[-3000:]
    reference = load_file(str(reference_dir / "model.safetensors"))
    rates = _learning_rates(reference_dir)
    assert [lr for _, lr in rates] == [1e-3] * 6 + [5e-4] * 3, rates  # the plateau did reduce, once
    assert _learning_rates(interrupted) == rates
    assert reference.keys() == resumed.keys()
    assert any(k.endswith("running_var") for k in reference)
    for key in reference:
        np.testing.assert_array_equal(resumed[key], reference[key], err_msg=key)
