"""ReduceLROnPlateau on an evaluation metric, with PyTorch's semantics (torch.optim.lr_scheduler).

Evaluation runs once per epoch on the host, so the decision lives on the host: `Plateau.step(value)` after each
evaluation returns the new learning rate, and the trainer writes `lr / peak` into the optimizer's
`lr_scale` (`optim.scale_by_lr_multiplier`). Both halves are checkpointed: the multiplier with the optimizer
state, this state (best, bad epochs, cooldown) in the checkpoint's progress, so a resumed run is exact.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from medclip.training.errors import ConfigError, check_choice
from medclip.training.eval_metrics import check_metric

if TYPE_CHECKING:
    from medclip.training.arguments import TrainingArguments

LOWER_IS_BETTER = ("loss", "rank")  # metric names containing these are minimised (plateau and best model)
TORCH_EPS = 1e-8  # torch's `eps`: a reduction smaller than this is ignored


def mode_for(metric: str) -> str:
    """'min' for losses and ranks, 'max' for recalls and MRR."""
    return "min" if any(word in metric for word in LOWER_IS_BETTER) else "max"


THRESHOLD_MODES = ("rel", "abs")


@dataclasses.dataclass(frozen=True)
class PlateauConfig:
    mode: str = "min"  # min | max
    factor: float = 0.1
    patience: int = 10
    threshold: float = 1e-4
    threshold_mode: str = "rel"  # rel | abs
    cooldown: int = 0
    min_lr: float = 0.0
    metric: str | None = None  # the eval metric it steps on (--plateau_metric), which sets `mode`

    @classmethod
    def from_args(cls, args: TrainingArguments) -> PlateauConfig:
        return cls(mode=mode_for(args.plateau_metric), factor=args.plateau_factor, patience=args.plateau_patience,
                   threshold=args.plateau_threshold, threshold_mode=args.plateau_threshold_mode,
                   cooldown=args.plateau_cooldown, min_lr=args.plateau_min_lr, metric=args.plateau_metric)

    def check(self) -> None:
        """ConfigError naming the flag (ranges: arguments.FLAG_RANGES; the schedule it needs: OptimizerConfig)."""
        if self.metric is not None:
            check_metric("--plateau_metric", self.metric)
        check_choice("--plateau_threshold_mode", self.threshold_mode, THRESHOLD_MODES)
        if self.mode not in ("min", "max"):
            raise ConfigError(f"plateau mode must be min or max, not {self.mode!r}")


@dataclasses.dataclass
class PlateauState:
    """JSON-ready: saved in the checkpoint's progress. `best` None = no evaluation yet (torch: +-inf)."""

    lr: float
    best: float | None = None
    num_bad_epochs: int = 0
    cooldown_counter: int = 0
    last_epoch: int = 0


class Plateau:
    """One learning rate (the run's --learning_rate; per-tower rates follow it by the same factor)."""

    def __init__(self, config: PlateauConfig, lr: float, state: dict[str, Any] | None = None):
        config.check()
        self.config = config
        self.state = PlateauState(**state) if state is not None else PlateauState(lr=lr)

    def _is_better(self, value: float) -> bool:
        best, c = self.state.best, self.config
        if best is None:
            best = float("inf") if c.mode == "min" else float("-inf")
        if c.mode == "min":
            return value < (best * (1.0 - c.threshold) if c.threshold_mode == "rel" else best - c.threshold)
        return value > (best * (c.threshold + 1.0) if c.threshold_mode == "rel" else best + c.threshold)

    def step(self, value: float) -> float:
        """Feeds one evaluation's metric; returns the learning rate for the next epoch."""
        s, c = self.state, self.config
        value = float(value)
        s.last_epoch += 1
        if self._is_better(value):
            s.best, s.num_bad_epochs = value, 0
        else:
            s.num_bad_epochs += 1
        if s.cooldown_counter > 0:
            s.cooldown_counter -= 1
            s.num_bad_epochs = 0  # bad epochs in cooldown do not count
        if s.num_bad_epochs > c.patience:
            new_lr = max(s.lr * c.factor, c.min_lr)
            if s.lr - new_lr > TORCH_EPS:
                s.lr = new_lr
            s.cooldown_counter, s.num_bad_epochs = c.cooldown, 0
        return s.lr

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.state)
