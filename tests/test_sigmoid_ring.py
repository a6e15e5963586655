"""The ring (big_vision's chunked) sigmoid loss equals the all-gathered one at 8 simulated devices: loss, t2i
accuracy and gradients as functions of the embeddings, and a tiny SigLIP's train steps (losses, gradient norms,
parameters) against the gathered form on one device; the flag is checked like every loss option."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medclip.training.arguments import DataArguments, ModelArguments, TrainingArguments
from medclip.training.config_check import ConfigError, validate

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.heavy
def test_ring_equals_gathered_at_eight_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "tests.sigmoid_ring_check"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for case in ("bias", "no_bias"):
        r = report[case]
        assert r["loss_diff"] < 1e-5 * r["loss"], report
        assert 0 < r["accuracy"] < 1 and r["accuracy_diff"] == 0, report
        assert r["grad_diff"] < 1e-5 * r["grad_max"], report
    assert len(set(report["losses"])) > 1  # the steps really trained
    assert report["step"]["loss_diff"] < 1e-5 * max(report["losses"]), report
    assert report["step"]["grad_norm_diff"] < 1e-5 * max(report["grad_norms"]), report
    assert report["step"]["param_diff"] < 1e-4, report


def _flags(**train):
    model = ModelArguments(text_config="bert.tiny", vision_config="clip_vision_model.tiny",
                           tokenizer_name="bert-base-uncased", logit_bias_init=-10.0)
    return model, DataArguments(synthetic_train_samples=8), TrainingArguments(output_dir="out", do_train=True, **train)


def test_sigmoid_form_is_checked_like_the_other_loss_options():
    validate(*_flags(loss="sigmoid", sigmoid_form="ring"))
    with pytest.raises(ConfigError, match="--sigmoid_form"):
        validate(*_flags(loss="sigmoid", sigmoid_form="chunks"))
    with pytest.raises(ConfigError, match="--sigmoid_form ring computes --loss sigmoid"):
        validate(*_flags(loss="clip", sigmoid_form="ring"))
