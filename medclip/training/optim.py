"""optax Adam(W) with the schedules, masks and options of the recipe.

No weight decay on biases, norms, embeddings and the temperature/bias scalars (decaying the temperature
towards 0 would fight the loss), unless `weight_decay_mask` asks for a reference's own grouping (open_clip's, or
PyTorch's single group); per-tower learning rates; freezing a tower (locked-image tuning).
Weight decay is decoupled (AdamW, the default) or L2 as PyTorch's `torch.optim.Adam(weight_decay=...)` applies it
(`weight_decay * param` added to the gradient before the moments). With ReduceLROnPlateau, a multiplier held in
the optimizer state (`lr_scale`, set on the host after each evaluation) scales every update.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from medclip.training.errors import ConfigError, check_choice

if TYPE_CHECKING:
    from medclip.training.arguments import TrainingArguments

# Parameter paths ('.'-joined) that get no weight decay: `.scale` is every norm's gain, LayerNorm's and BatchNorm's.
# Embedding tables end in `.embedding`; the ViT patch projection (`patch_embedding`) is a weight and decays.
NO_DECAY = re.compile(r"(\.bias$|\.scale$|norm|\.embedding$|class_embedding$|^logit_scale$|^logit_bias$"
                      r"|^hybrid_alpha_logit$)")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 5e-5
    warmup_steps: int = 0
    total_steps: int = 1000
    schedule: str = "linear"  # linear (warmup then linear decay to 0, the original) | cosine | constant
    weight_decay: float = 0.1
    weight_decay_type: str = "decoupled"  # decoupled (AdamW) | l2 (torch.optim.Adam's weight_decay)
    weight_decay_mask: str = "default"  # default (NO_DECAY skipped) | ndim (open_clip's) | all (every parameter)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = 1.0
    gradient_accumulation_steps: int = 1
    vision_learning_rate: float | None = None  # None: learning_rate
    text_learning_rate: float | None = None
    freeze_vision: bool = False
    freeze_text: bool = False
    lr_multiplier: bool = False  # an `lr_scale` in the state, set from outside (ReduceLROnPlateau)

    @classmethod
    def from_args(cls, args: TrainingArguments, steps: int = 1) -> OptimizerConfig:
        """`steps`: the run's training steps (batches); the schedules count optimizer updates, one per
        --gradient_accumulation_steps batches."""
        return cls(learning_rate=args.learning_rate, warmup_steps=args.warmup_steps,
                   total_steps=max(steps // args.gradient_accumulation_steps, 1), schedule=args.lr_schedule,
                   weight_decay=args.weight_decay, weight_decay_type=args.weight_decay_type,
                   weight_decay_mask=args.weight_decay_mask, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
                   adam_epsilon=args.adam_epsilon, max_grad_norm=args.max_grad_norm or None,
                   gradient_accumulation_steps=args.gradient_accumulation_steps,
                   vision_learning_rate=args.vision_learning_rate, text_learning_rate=args.text_learning_rate,
                   freeze_vision=args.freeze_vision, freeze_text=args.freeze_text,
                   lr_multiplier=args.reduce_lr_on_plateau)

    def check(self) -> None:
        """ConfigError naming the flag, for settings no optimizer is built from (ranges: arguments.FLAG_RANGES)."""
        check_choice("--lr_schedule", self.schedule, SCHEDULES)
        check_choice("--weight_decay_type", self.weight_decay_type, WEIGHT_DECAY_TYPES)
        check_choice("--weight_decay_mask", self.weight_decay_mask, WEIGHT_DECAY_MASKS)
        if self.freeze_vision and self.freeze_text:
            raise ConfigError("--freeze_vision and --freeze_text together leave only the projections to train; "
                              "drop one of them")
        # One schedule owns the learning rate: a decay that also falls on its own would make the plateau's
        # reductions compound with it in ways nobody reads off a curve. Warmup is allowed.
        if self.lr_multiplier and self.schedule != "constant":
            raise ConfigError(f"--reduce_lr_on_plateau needs --lr_schedule constant (after --warmup_steps), "
                              f"not {self.schedule!r}: the plateau is the decay")


SCHEDULES = ("linear", "cosine", "constant")
WEIGHT_DECAY_TYPES = ("decoupled", "l2")
WEIGHT_DECAY_MASKS = ("default", "ndim", "all")


class LearningRateScaleState(NamedTuple):
    lr_scale: jax.Array  # f32 scalar multiplying every update; the trainer sets it (optax.tree_utils.tree_set)


def scale_by_lr_multiplier() -> optax.GradientTransformation:
    """Multiplies the updates by `lr_scale` from the state (1 at init). Scaling the whole Adam(W) update is
    scaling its learning rate: AdamW's decay term is lr * wd * param, inside the scaled update."""

    def init(params):
        del params
        return LearningRateScaleState(lr_scale=jnp.ones((), jnp.float32))

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u: u * state.lr_scale.astype(u.dtype), updates), state

    return optax.GradientTransformation(init, update)


def make_schedule(peak: float, config: OptimizerConfig) -> optax.Schedule:
    check_choice("--lr_schedule", config.schedule, SCHEDULES)
    warmup = min(config.warmup_steps, config.total_steps)
    decay_steps = max(config.total_steps - warmup, 1)
    if config.schedule == "linear":
        decay = optax.linear_schedule(peak, 0.0, decay_steps)
    elif config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
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
    """Returns the transformation and its named learning-rate schedules (for logging). ConfigError (a
    ValueError) for a config that `OptimizerConfig.check` refuses."""
    config.check()
    schedules = {
        "head": make_schedule(config.learning_rate, config),
        "vision": make_schedule(config.vision_learning_rate or config.learning_rate, config),
        "text": make_schedule(config.text_learning_rate or config.learning_rate, config),
    }
    # "all": what torch.optim.Adam(model.parameters(), weight_decay=...) does (PubMedCLIP): one param group.
    # "ndim": open_clip's exclusion (PMC-CLIP's main.py): every parameter of fewer than 2 dimensions (gains,
    # biases, the temperature) is skipped, embedding tables decay.
    mask = {"default": decay_mask, "ndim": lambda params: jax.tree.map(lambda p: jnp.ndim(p) >= 2, params),
            "all": None}[config.weight_decay_mask]

    def adam(schedule):
        if config.weight_decay_type == "decoupled":
            return optax.adamw(schedule, b1=config.adam_beta1, b2=config.adam_beta2, eps=config.adam_epsilon,
                               weight_decay=config.weight_decay, mask=mask)
        # l2, torch.optim.Adam: grad += wd * param, then the moments
        return optax.chain(optax.add_decayed_weights(config.weight_decay, mask=mask),
                           optax.scale_by_adam(b1=config.adam_beta1, b2=config.adam_beta2, eps=config.adam_epsilon),
                           optax.scale_by_learning_rate(schedule))

    transforms = {name: adam(s) for name, s in schedules.items()}
    transforms["frozen"] = optax.set_to_zero()
    chain = []
    if config.max_grad_norm:
        chain.append(optax.clip_by_global_norm(config.max_grad_norm))
    chain.append(optax.multi_transform(transforms, lambda p: tower_labels(p, config)))
    if config.lr_multiplier:
        chain.append(scale_by_lr_multiplier())
    tx = optax.chain(*chain)
    if config.gradient_accumulation_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.gradient_accumulation_steps)
    return tx, schedules


def set_lr_scale(opt_state: Any, scale: jax.Array) -> Any:
    """The optimizer state with its `lr_scale` replaced (the optimizer must have `lr_multiplier=True`)."""
    return optax.tree_utils.tree_set(opt_state, lr_scale=scale)
