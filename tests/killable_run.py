"""Running `run_hybrid_clip.py` as a child process that a test can kill and restart (resume tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(folder: Path) -> Path:
    """A saved tiny ModifiedResNet + BERT model with its tokenizer (folder/rn): seconds to train a few steps, and
    it carries BatchNorm running statistics, which resume must restore too."""
    from flax import nnx

    from medclip import FlaxHybridCLIP, HybridCLIPConfig
    from medclip.data.synthetic import write_synthetic_tokenizer
    from medclip.models import BertConfig, HeadConfig
    from medclip.models.modified_resnet import ModifiedResNetConfig

    tokenizer = write_synthetic_tokenizer(folder / "tokenizer")
    config = HybridCLIPConfig(vision_config=ModifiedResNetConfig(layers=(1, 1, 1, 1), width=8, heads=4,
                                                                 output_dim=32, image_size=32),
                              text_config=BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=4, intermediate_size=64,
                                                     max_position_embeddings=32),
                              projection_dim=32, vision_head=HeadConfig(type="none"))
    FlaxHybridCLIP(config, rngs=nnx.Rngs(0)).save_pretrained(folder / "rn", tokenizer=tokenizer)
    return folder / "rn"


def start(output_dir: Path | str, log: Path, args: list[str]) -> subprocess.Popen:
    with log.open("a") as f:
        return subprocess.Popen([sys.executable, "run_hybrid_clip.py", "--output_dir", str(output_dir), *args],
                                cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def latest_saved_step(output_dir: Path) -> int:
    folder = output_dir / "checkpoints"
    return max([int(p.name) for p in folder.iterdir() if p.name.isdigit()], default=0) if folder.is_dir() else 0


def finish(output_dir: Path, log: Path, args: list[str], timeout: int = 900) -> dict[str, np.ndarray]:
    """Runs (or resumes) to the end; the exported parameters."""
    proc = start(output_dir, log, args)
    assert proc.wait(timeout=timeout) == 0, log.read_text()[-3000:]
    return load_file(str(output_dir / "model.safetensors"))
