"""The jitted training and evaluation steps, functional over `nnx.split` state.

Jitting a pure function of (state, batch) keeps the hot loop free of NNX graph traversal (STYLE.md) and
lets us donate the state buffers. The loss sees the global batch: logits are (global, global).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from medclip.training import losses


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken (skipped non-finite steps included)
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32[2]; the dropout key of step s is fold_in(rng, s), so resuming is exact
    nonfinite_in_a_row: jax.Array
    nonfinite_total: jax.Array


@dataclasses.dataclass(frozen=True)
class StepConfig:
    loss: str = "clip"  # clip | hybrid | sigmoid
    hybrid_alpha: float = 0.5
    hybrid_temperature: float = 1.0
    dropout: bool = False  # text-tower dropout as in BERT's config (the original recipe trained with it)
    freeze_vision: bool = False
    freeze_text: bool = False


def init_state(params: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
    zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731  (one buffer each, so the state can be donated)
    return TrainState(step=zero(), params=params, opt_state=tx.init(params), rng=jax.random.PRNGKey(seed),
                      nonfinite_in_a_row=zero(), nonfinite_total=zero())


def compute_loss(config: StepConfig, out: Any) -> jax.Array:
    if config.loss == "clip":
        return losses.clip_loss(out.logits_per_text)
    if config.loss == "hybrid":
        return losses.hybrid_loss(out.logits_per_text, out.image_embeds, out.text_embeds,
                                  config.hybrid_alpha, config.hybrid_temperature)
    if config.loss == "sigmoid":
        return losses.sigmoid_loss(out.logits_per_text)
    raise ValueError(f"unknown loss {config.loss!r}; choose from {losses.LOSSES}")


def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    config: StepConfig) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Returns step(state, batch) -> (state, metrics), not yet jitted (the trainer jits with shardings).

    A non-finite loss or gradient skips the update (parameters and optimizer state unchanged) and is
    counted; the trainer stops after too many in a row.
    """

    def loss_fn(params, batch, rng):
        if config.freeze_vision:  # no backward pass through a locked tower
            params = {**params, "vision_model": jax.lax.stop_gradient(params["vision_model"])}
        if config.freeze_text:
            params = {**params, "text_model": jax.lax.stop_gradient(params["text_model"])}
        model = nnx.merge(graphdef, params)
        out = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                    dropout_rng=rng if config.dropout else None)
        return compute_loss(config, out), out.logits_per_text

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
        finite = jnp.isfinite(loss) & _all_finite(grads)
        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        in_a_row = jnp.where(finite, 0, state.nonfinite_in_a_row + 1)
        new_state = TrainState(step=state.step + 1, params=keep(new_params, state.params),
                               opt_state=keep(new_opt_state, state.opt_state), rng=state.rng,
                               nonfinite_in_a_row=in_a_row,
                               nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32))
        accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == jnp.arange(logits.shape[0]))
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "finite": finite,
                   "logit_scale": jnp.exp(state.params["logit_scale"]), "in_batch_t2i_acc": accuracy}
        return new_state, metrics

    return step


def make_embed_step(graphdef: nnx.GraphDef) -> Callable[[Any, dict], tuple[jax.Array, jax.Array]]:
    """(params, batch) -> L2-normalised (image_embeds, text_embeds), for evaluation and indexing."""

    def embed(params, batch):
        model = nnx.merge(graphdef, params)
        out = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
        return out.image_embeds, out.text_embeds

    return embed
