"""The real CLI on synthetic data: loss falls and retrieval beats chance by a wide margin; the exported
folder loads with FlaxHybridCLIP.from_pretrained and carries its model card and curves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from medclip import FlaxHybridCLIP

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.heavy
def test_run_hybrid_clip_learns_the_synthetic_task(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "run_hybrid_clip.py", "--output_dir", str(out), "--model_preset", "demo",
           "--synthetic_train_samples", "1024", "--synthetic_validation_samples", "128", "--synthetic_image_size", "32",
           "--max_seq_length", "32", "--do_train", "--do_eval", "--num_train_epochs", "4",
           "--per_device_train_batch_size", "64", "--per_device_eval_batch_size", "64", "--learning_rate", "2e-3",
           "--warmup_steps", "8", "--weight_decay", "0.1", "--logging_steps", "4", "--save_steps", "0"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r["train_loss"] for r in rows if "train_loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert len(evals) == 4
    assert sum(train[-3:]) / 3 < 0.8 * sum(train[:3]) / 3, train
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    chance_r10 = 10 / 128
    final = evals[-1]
    assert final["eval_t2i_R@10"] > 3 * chance_r10 and final["eval_i2t_R@10"] > 3 * chance_r10, final
    assert final["eval_t2i_median_rank"] < 128 / 4
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["steps"] == 64 and summary["dropped"]["train"]["dropped"] == 0
    model = FlaxHybridCLIP.from_pretrained(out)
    assert model.config.vision_config.image_size == 32
    assert "Not for clinical use" in (out / "README.md").read_text()
    assert (out / "training_curves.png").stat().st_size > 10_000
    assert (out / "best" / "model.safetensors").exists()
    assert list((out / "tensorboard").iterdir())
