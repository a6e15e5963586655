"""Orbax checkpoints of the whole training state plus the data position, for exact resume.

Orbax writes each step to a temporary folder and renames it when complete (on GCS, where there is no rename, it
writes a commit marker last), so a process killed during a save leaves the previous checkpoint intact; the
unfinished one is ignored on restore. The folder may be local or a bucket URL (medclip.storage).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from medclip.storage import AnyPath, as_path

logger = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: str | Path, *, max_to_keep: int = 3):
        path = as_path(directory)
        self.directory: AnyPath = path.absolute() if isinstance(path, Path) else path
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=False),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> bool:
        """Saves unless the parameters are non-finite (never checkpoint a diverged model)."""
        finite = all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(state.params))
        if not finite:
            logger.error("step %d: non-finite parameters, checkpoint NOT saved", step)
            return False
        if step in self.manager.all_steps():
            return True
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()
        return True

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """`abstract_state` carries the shardings to restore onto (ShapeDtypeStructs with .sharding)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def close(self) -> None:
        self.manager.close()
