"""The medsiglip recipe on tiny SigLIP towers: a few steps through the real CLI (the recipe's settings, remat,
the ring form of the sigmoid loss) lower the validation loss; with --freeze_vision its locked image tower is
cacheable (LiT), so the recipe's LiT option computes the tower once per image."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medclip import FlaxHybridCLIP
from tests.sigmoid_ring_check import tiny_siglip
from tests.test_recipes import _parse

ROOT = Path(__file__).resolve().parents[1]


def _tiny_siglip_folder(folder: Path, vocab_size: int) -> Path:
    """A SiglipModel folder (saved by our code as transformers lays it out) of tiny towers: 32 px, 16 tokens."""
    config = tiny_siglip()
    text = config.text_config.replace(vocab_size=vocab_size, pad_token_id=0)
    FlaxHybridCLIP(config.replace(text_config=text)).save_pretrained(folder)
    return folder


@pytest.mark.heavy
def test_medsiglip_recipe_lowers_the_loss_on_tiny_siglip_towers(tmp_path):
    from medclip.data.synthetic import write_synthetic_tokenizer

    tokenizer = write_synthetic_tokenizer(tmp_path / "tokenizer")
    model = _tiny_siglip_folder(tmp_path / "siglip", len(tokenizer))
    out = tmp_path / "run"
    # the recipe's optimiser, schedule, loss and remat; a tiny model, synthetic pairs, one update per batch of 8
    cmd = [sys.executable, "run_hybrid_clip.py", "--recipe", "medsiglip", "--output_dir", str(out),
           "--model_name_or_path", str(model), "--tokenizer_name", str(tmp_path / "tokenizer"),
           "--synthetic_train_samples", "64", "--synthetic_validation_samples", "32", "--synthetic_image_size", "32",
           "--max_seq_length", "16", "--gradient_accumulation_steps", "1", "--num_train_epochs", "3",
           "--sigmoid_form", "ring", "--logging_steps", "1", "--save_steps", "0", "--report_to", "none"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 3 and all(np.isfinite(evals)), rows
    assert evals[-1] < evals[0], evals
    assert [r["learning_rate"] for r in rows if "learning_rate" in r][0] == pytest.approx(1e-4 / 5)  # warmup 5
    assert json.loads((out / "config.json").read_text())["model_type"] == "siglip"  # exported as a SiglipModel


def test_medsiglip_lit_option_caches_the_locked_image_tower(tmp_path):
    from medclip.training.image_cache import why_not_cacheable

    model_args, data_args, train_args = _parse("--recipe", "medsiglip", "--data_dir", "/data/roco",
                                               "--freeze_vision", "true")
    model = FlaxHybridCLIP(tiny_siglip())
    assert train_args.cache_locked_image == "auto"
    assert why_not_cacheable(model, freeze_vision=train_args.freeze_vision, train_crop=data_args.train_crop,
                             hflip=data_args.hflip, dropout=model_args.text_dropout,
                             freeze_bn_stats=train_args.freeze_bn_stats) is None
    # and without --freeze_vision the recipe trains the whole model
    _, data_args, train_args = _parse("--recipe", "medsiglip")
    assert why_not_cacheable(model, freeze_vision=train_args.freeze_vision, train_crop=data_args.train_crop,
                             hflip=data_args.hflip, dropout=True, freeze_bn_stats=False) is not None
