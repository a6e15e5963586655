"""SIGKILL at random moments (saves happen every step, so kills land during saves too), resume, and end
with exactly the parameters of a run that was never interrupted."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from tests import killable_run

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--model_preset", "demo", "--synthetic_train_samples", "192", "--synthetic_validation_samples", "32",
        "--synthetic_image_size", "32", "--max_seq_length", "24", "--do_train", "--num_train_epochs", "2",
        "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "32", "--learning_rate", "1e-3",
        "--save_steps", "1", "--logging_steps", "1", "--report_to", "none", "--seed", "3"]


@pytest.fixture(params=["vit", "batchnorm"])
def run_args(request, tmp_path) -> list[str]:
    """The demo preset (CLIP ViT + BERT), or a ModifiedResNet tower whose BatchNorm statistics must resume
    exactly too (they are in the exported model.safetensors as running_mean / running_var)."""
    if request.param == "vit":
        return ARGS
    from flax import nnx

    from medclip import FlaxHybridCLIP, HybridCLIPConfig
    from medclip.data.synthetic import write_synthetic_tokenizer
    from medclip.models import BertConfig, HeadConfig
    from medclip.models.modified_resnet import ModifiedResNetConfig

    tokenizer = write_synthetic_tokenizer(tmp_path / "tokenizer")
    config = HybridCLIPConfig(vision_config=ModifiedResNetConfig(layers=(1, 1, 1, 1), width=8, heads=4,
                                                                 output_dim=32, image_size=32),
                              text_config=BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=4, intermediate_size=64,
                                                     max_position_embeddings=32),
                              projection_dim=32, vision_head=HeadConfig(type="none"))
    FlaxHybridCLIP(config, rngs=nnx.Rngs(0)).save_pretrained(tmp_path / "rn", tokenizer=tokenizer)
    return ["--model_name_or_path", str(tmp_path / "rn"), *ARGS[2:]]


def test_sigkill_anywhere_then_resume_gives_identical_parameters(tmp_path, run_args):
    reference = killable_run.finish(tmp_path / "reference", tmp_path / "reference.log", run_args)

    interrupted, log = tmp_path / "interrupted", tmp_path / "interrupted.log"
    rng = random.Random(0)
    kills = 0
    for round_ in range(2):
        proc = killable_run.start(interrupted, log, run_args)
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
    resumed = killable_run.finish(interrupted, log, run_args)

    assert reference.keys() == resumed.keys()
    if "batchnorm" in str(tmp_path):
        assert any(k.endswith("running_var") for k in reference)
    for key in reference:
        np.testing.assert_array_equal(resumed[key], reference[key], err_msg=key)
