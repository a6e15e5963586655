"""Each model family of the zoo trains through the real `run_hybrid_clip.py`: a whole CLIPModel (PubMedCLIP's
full fine-tuning) and the BiomedCLIP architecture from an OpenCLIP folder; and on 8 simulated devices a step of
each equals the step on 1 (BatchNorm statistics too: `param_diff` covers them)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from flax import nnx

from medclip import FlaxHybridCLIP, HybridCLIPConfig
from medclip.data.synthetic import write_synthetic_tokenizer
from medclip.models import CLIPTextConfig, CLIPVisionConfig

ROOT = Path(__file__).resolve().parents[1]


def _train(model_dir: Path, out: Path, image_size: int, *extra: str) -> list[float]:
    cmd = [sys.executable, "run_hybrid_clip.py", "--output_dir", str(out), "--model_name_or_path", str(model_dir),
           "--synthetic_train_samples", "256", "--synthetic_validation_samples", "64",
           "--synthetic_image_size", str(image_size), "--max_seq_length", "32", "--do_train", "--do_eval",
           "--max_steps", "40", "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "32",
           "--learning_rate", "1e-3", "--warmup_steps", "2", "--logging_steps", "4", "--save_steps", "0",
           "--report_to", "none", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r]


@pytest.mark.heavy
def test_whole_clip_model_fine_tunes(tmp_path):
    tokenizer = write_synthetic_tokenizer(tmp_path / "tok")
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=32, pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    model = FlaxHybridCLIP(HybridCLIPConfig(vision_config=vision, text_config=text, projection_dim=32),
                           rngs=nnx.Rngs(0))
    model.save_pretrained(tmp_path / "clip", tokenizer=tokenizer)
    assert json.loads((tmp_path / "clip" / "config.json").read_text())["model_type"] == "clip"
    losses = _train(tmp_path / "clip", tmp_path / "run", 32)
    assert sum(losses[-3:]) / 3 < 0.9 * math.log(32), losses  # below chance: it learned to match, not just scale
    assert FlaxHybridCLIP.from_pretrained(tmp_path / "run").config.is_clip


@pytest.mark.heavy
def test_biomedclip_architecture_fine_tunes_from_an_open_clip_folder(tmp_path):
    from tests.test_openclip_parity import _biomedclip_folder

    folder = _biomedclip_folder(tmp_path, local_text=True)  # its tokenizer: the MiniLM folder's, via the config
    # The pretrained MiniLM text tower at a BERT fine-tuning rate; the tiny random vision trunk much faster.
    losses = _train(folder, tmp_path / "run", 32, "--text_learning_rate", "5e-5", "--vision_learning_rate", "3e-3")
    assert sum(losses[-3:]) / 3 < 0.9 * math.log(32), losses
    again = FlaxHybridCLIP.from_pretrained(tmp_path / "run")
    assert again.config.text_head.type == "mlp" and type(again.config.vision_config).__name__ == "TimmViTConfig"


@pytest.mark.parametrize("family", ["clip", "biomedclip", "modified_resnet"])
def test_eight_devices_match_one(family):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "tests.sharded_step_check", family], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(set(report["losses"])) > 1  # the steps really trained
    assert report["replicated"]["loss_diff"] < 1e-5, report
    # fp32 reduction order differs across devices: the norm agrees to 1e-5 of its size
    assert report["replicated"]["grad_norm_diff"] < 1e-5 * max(1.0, *report["grad_norms"]), report
    assert report["replicated"]["param_diff"] < 1e-4, report
