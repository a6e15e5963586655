"""Metrics to a JSON-lines file, TensorBoard and optionally Weights & Biases (process 0 only).

The output folder may be a bucket URL (medclip.storage): metrics.jsonl is then rewritten whole at each log (an
object cannot grow in place), and TensorBoard's event files are written to a local folder and uploaded after each
flush, so that they go through the same storage client as everything else.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import jax

from medclip import storage
from medclip.training.config_check import ConfigError

log = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(self, output_dir: str | Path, report_to: str = "tensorboard", run_config: dict | None = None):
        self.enabled = jax.process_index() == 0
        self.jsonl = storage.as_path(output_dir) / "metrics.jsonl"
        targets = {t.strip() for t in report_to.split(",") if t.strip() and t.strip() != "none"}
        self._tb = None
        self._wandb = None
        self._staging: tempfile.TemporaryDirectory | None = None
        self._tb_url = storage.join(output_dir, "tensorboard") if storage.is_url(output_dir) else None
        if not self.enabled:
            return
        if isinstance(self.jsonl, Path):
            self.jsonl.parent.mkdir(parents=True, exist_ok=True)
        local_dir = output_dir
        if storage.is_url(output_dir) and targets & {"tensorboard", "wandb"}:
            self._staging = tempfile.TemporaryDirectory(prefix="medclip-logs-")
            local_dir = self._staging.name
        if "tensorboard" in targets:
            import tensorflow as tf

            self._tb = tf.summary.create_file_writer(str(Path(local_dir) / "tensorboard"))
        if "wandb" in targets:
            try:
                import wandb
            except ImportError:
                raise ConfigError("--report_to wandb needs `pip install wandb`") from None
            self._wandb = wandb.init(config=run_config or {}, dir=str(local_dir))

    def truncate_after(self, step: int) -> None:
        """On resume, forget what was logged after the restored checkpoint: those steps run again."""
        if self.enabled:
            truncate_jsonl(self.jsonl, step)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        storage.append_text(self.jsonl, json.dumps(record) + "\n")
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            import tensorflow as tf

            with self._tb.as_default(step=int(step)):
                for key, value in numbers.items():
                    tf.summary.scalar(key, value)
            self._tb.flush()
            self._upload_tensorboard()
        if self._wandb is not None and numbers:  # (a record of nested numbers, e.g. the phase table: file only)
            self._wandb.log(numbers, step=int(step))

    def _upload_tensorboard(self) -> None:
        if self._staging is not None and self._tb_url is not None:
            storage.upload_folder(Path(self._staging.name) / "tensorboard", self._tb_url)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._upload_tensorboard()
        if self._wandb is not None:
            self._wandb.finish()
        if self._staging is not None:
            self._staging.cleanup()


def truncate_jsonl(path: str | Path, step: int) -> None:
    """Drops the lines of a JSON-lines log whose "step" is after `step` (local file or bucket object)."""
    path = storage.as_path(path)
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
        storage.write_text(path, "".join(line + "\n" for line in kept))


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return value
