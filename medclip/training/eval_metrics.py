"""The metrics `Trainer.evaluate` logs, each as eval_<name>: the training loss on the validation set, then
`evaluate_retrieval`'s defaults (`retrieval.metric_names`). --metric_for_best_model and --plateau_metric name
one of them; `check_metric` refuses any other before the run starts, not at its first evaluation."""

from __future__ import annotations

from medclip.evaluation.retrieval import metric_names
from medclip.training.errors import ConfigError

EVAL_METRICS = ("loss", *metric_names())


def eval_metric_names() -> list[str]:
    return list(EVAL_METRICS)


def metric_key(name: str) -> str:
    """'t2i_R@5' or 'eval_t2i_R@5' -> 'eval_t2i_R@5' (the key in the evaluation's metrics)."""
    return "eval_" + name.removeprefix("eval_")


def check_metric(flag: str, name: str) -> None:
    if name.removeprefix("eval_") not in EVAL_METRICS:
        raise ConfigError(f"{flag} {name!r} is not an eval metric; choose from {', '.join(EVAL_METRICS)} "
                          "(with or without the eval_ prefix)")
