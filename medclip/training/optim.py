"""optax AdamW with the schedules, masks and options of the recipe.

No weight decay on biases, norms, embeddings and the temperature/bias scalars (decaying the temperature
towards 0 would fight the loss); per-tower learning rates; freezing a tower (locked-image tuning).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import optax

# Parameter paths ('.'-joined) that get no weight decay.
# Embedding tables end in `.embedding`; the ViT patch projection (`patch_embedding`) is a weight and decays.
NO_DECAY = re.compile(r"(\.bias$|norm|\.embedding$|class_embedding$|^logit_scale$|^logit_bias$)")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 5e-5
    warmup_steps: int = 0
    total_steps: int = 1000
    schedule: str = "linear"  # linear (warmup then linear decay to 0, the original) | cosine | constant
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = 1.0
    gradient_accumulation_steps: int = 1
    vision_learning_rate: float | None = None  # None: learning_rate
    text_learning_rate: float | None = None
    freeze_vision: bool = False
    freeze_text: bool = False


def make_schedule(peak: float, config: OptimizerConfig) -> optax.Schedule:
    warmup = min(config.warmup_steps, config.total_steps)
    decay_steps = max(config.total_steps - warmup, 1)
    if config.schedule == "linear":
        decay = optax.linear_schedule(peak, 0.0, decay_steps)
    elif config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps)
    elif config.schedule == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(f"unknown schedule {config.schedule!r}; use linear, cosine or constant")
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def _path(keys: tuple) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys)


def decay_mask(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(lambda p, _: not NO_DECAY.search(_path(p)), params)


def tower_labels(params: Any, config: OptimizerConfig) -> Any:
    """'vision' / 'text' / 'frozen' / 'head' per leaf; projections and temperature are 'head'."""

    def label(path, _):
        name = _path(path)
        tower = "vision" if name.startswith("vision_model") else "text" if name.startswith("text_model") else "head"
        if (tower == "vision" and config.freeze_vision) or (tower == "text" and config.freeze_text):
            return "frozen"
        return tower

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(params: Any, config: OptimizerConfig) -> tuple[optax.GradientTransformation, dict[str, optax.Schedule]]:
    """Returns the transformation and its named learning-rate schedules (for logging)."""
    schedules = {
        "head": make_schedule(config.learning_rate, config),
        "vision": make_schedule(config.vision_learning_rate or config.learning_rate, config),
        "text": make_schedule(config.text_learning_rate or config.learning_rate, config),
    }

    def adamw(schedule):
        return optax.adamw(schedule, b1=config.adam_beta1, b2=config.adam_beta2, eps=config.adam_epsilon,
                           weight_decay=config.weight_decay, mask=decay_mask)

    transforms = {name: adamw(s) for name, s in schedules.items()}
    transforms["frozen"] = optax.set_to_zero()
    chain = []
    if config.max_grad_norm:
        chain.append(optax.clip_by_global_norm(config.max_grad_norm))
    chain.append(optax.multi_transform(transforms, lambda p: tower_labels(p, config)))
    tx = optax.chain(*chain)
    if config.gradient_accumulation_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.gradient_accumulation_steps)
    return tx, schedules
