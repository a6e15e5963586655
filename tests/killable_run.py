"""Running `run_hybrid_clip.py` as a child process that a test can kill and restart (resume tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[1]


def start(output_dir: Path, log: Path, args: list[str]) -> subprocess.Popen:
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
