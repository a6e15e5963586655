"""Metrics to a JSON-lines file, TensorBoard and optionally Weights & Biases (process 0 only)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax

from medclip.training.config_check import ConfigError

log = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(self, output_dir: str | Path, report_to: str = "tensorboard", run_config: dict | None = None):
        self.enabled = jax.process_index() == 0
        self.jsonl = Path(output_dir) / "metrics.jsonl"
        targets = {t.strip() for t in report_to.split(",") if t.strip() and t.strip() != "none"}
        self._tb = None
        self._wandb = None
        if not self.enabled:
            return
        self.jsonl.parent.mkdir(parents=True, exist_ok=True)
        if "tensorboard" in targets:
            import tensorflow as tf

            self._tb = tf.summary.create_file_writer(str(Path(output_dir) / "tensorboard"))
        if "wandb" in targets:
            try:
                import wandb
            except ImportError:
                raise ConfigError("--report_to wandb needs `pip install wandb`") from None
            self._wandb = wandb.init(config=run_config or {}, dir=str(output_dir))

    def truncate_after(self, step: int) -> None:
        """On resume, forget what was logged after the restored checkpoint: those steps run again."""
        if self.enabled:
            truncate_jsonl(self.jsonl, step)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        with self.jsonl.open("a") as f:
            f.write(json.dumps(record) + "\n")
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            import tensorflow as tf

            with self._tb.as_default(step=int(step)):
                for key, value in numbers.items():
                    tf.summary.scalar(key, value)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numbers, step=int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def truncate_jsonl(path: Path, step: int) -> None:
    """Drops the lines of a JSON-lines log whose "step" is after `step`."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in kept))


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return value
