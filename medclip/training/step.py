"""The jitted training and evaluation steps, functional over `nnx.split` state.

Jitting a pure function of (state, batch) keeps the hot loop free of NNX graph traversal (the per-call Python
work of `nnx.jit`; benchmarks/train_step.py times this step, results in benchmarks/results/) and lets us donate
the state buffers. The loss sees the global batch: logits are (global, global).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from medclip.models.hybrid import (HybridCLIP, HybridCLIPOutput, contrastive_logits, l2_normalize,
                                  logit_temperature, tower_keys)
from medclip.models.packing import PackingPlan
from medclip.training import losses
from medclip.training.mlm import MASK_STREAM, MaskingConfig, mask_batch, mlm_loss_and_accuracy
from medclip.training.sigmoid_ring import sigmoid_loss_ring

if TYPE_CHECKING:
    from medclip.training.arguments import ModelArguments, TrainingArguments


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken (skipped non-finite steps included)
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32[2]; the dropout key of step s is fold_in(rng, s), so resuming is exact
    nonfinite_in_a_row: jax.Array
    nonfinite_total: jax.Array
    # BatchNorm running statistics (nnx.BatchStat), {} for towers without: state like the parameters, updated
    # by training steps (not by the optimizer), replicated on the mesh, checkpointed and exported.
    batch_stats: Any = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    loss: losses.LossConfig = dataclasses.field(default_factory=losses.LossConfig)
    dropout: bool = False  # text-tower dropout as in BERT's config (the original recipe trained with it)
    freeze_vision: bool = False
    freeze_text: bool = False
    freeze_bn_stats: bool = False  # BatchNorm uses and keeps its running statistics (open_clip's freeze_bn_stats)
    masking: MaskingConfig | None = None  # set: PMC-CLIP's MLM objective on the masked captions (--mlm)
    mlm_weight: float = 1.0  # loss = contrastive + mlm_weight * MLM loss
    mesh: Mesh | None = None  # the mesh the step is jitted over; the loss's ring form passes texts around it

    @classmethod
    def from_args(cls, model_args: ModelArguments, train_args: TrainingArguments, tokenizer: Any, *,
                  mesh: Mesh | None = None) -> StepConfig:
        """`tokenizer` gives --mlm its mask token and vocabulary."""
        masking = (MaskingConfig.from_tokenizer(tokenizer, train_args.mlm_probability, train_args.mlm_masking)
                   if train_args.mlm else None)
        return cls(loss=losses.LossConfig.from_args(train_args), dropout=model_args.text_dropout,
                   freeze_vision=train_args.freeze_vision, freeze_text=train_args.freeze_text,
                   freeze_bn_stats=train_args.freeze_bn_stats, masking=masking, mlm_weight=train_args.mlm_weight,
                   mesh=mesh)


def init_state(params: Any, tx: optax.GradientTransformation, seed: int, batch_stats: Any = None) -> TrainState:
    zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731  (one buffer each, so the state can be donated)
    return TrainState(step=zero(), params=params, opt_state=tx.init(params), rng=jax.random.PRNGKey(seed),
                      nonfinite_in_a_row=zero(), nonfinite_total=zero(),
                      batch_stats=jax.tree.map(jnp.array, batch_stats or {}))


def embeddings_output(image_embeds: jax.Array, text_embeds: jax.Array, logit_scale: jax.Array,
                      logit_bias: jax.Array | None = None, clamp: bool = True) -> HybridCLIPOutput:
    """The model's output rebuilt from its (normalised) embeddings and temperature/bias parameters, with the
    logits function `HybridCLIP.logits` uses (tests/test_eval_loss.py checks they agree)."""
    logits_per_text = contrastive_logits(image_embeds, text_embeds, logit_temperature(logit_scale, clamp), logit_bias)
    return HybridCLIPOutput(logits_per_image=logits_per_text.T, logits_per_text=logits_per_text,
                            image_embeds=image_embeds, text_embeds=text_embeds)


def make_eval_loss(config: losses.LossConfig, clamp_logit_scale: bool = True) -> Callable[..., float]:
    """(image_embeds, text_embeds, params, batch, fields) -> the configured training loss averaged over eval
    batches of `batch` pairs (the global train batch size, so it is comparable to the training loss).
    `clamp_logit_scale`: the model's (`HybridCLIPConfig.clamp_logit_scale`; False for SigLIP).
    `fields` holds the per-example arrays the loss reads (`losses.batch_fields`: the concept loss's concept ids
    and caption groups), in the order of the embeddings; they are cut into the same batches."""
    loss = jax.jit(lambda image, text, scale, bias, alpha, fields: losses.compute_loss(
        embeddings_output(image, text, scale, bias, clamp_logit_scale), config, fields,
        losses.LossParams(logit_temperature(scale, clamp_logit_scale), alpha)))

    def eval_loss(image_embeds: np.ndarray, text_embeds: np.ndarray, params: Any, batch: int,
                  fields: dict[str, np.ndarray] | None = None) -> float:
        scale, bias = jax.device_get(params["logit_scale"]), params.get("logit_bias")
        bias = None if bias is None else jax.device_get(bias)
        alpha = losses.split_params(params)[1]
        alpha = None if alpha is None else jax.device_get(alpha)
        fields = fields or {}
        values = [loss(image_embeds[start:start + batch], text_embeds[start:start + batch], scale, bias, alpha,
                       {k: v[start:start + batch] for k, v in fields.items()})
                  for start in range(0, len(image_embeds), batch)]
        return float(np.mean(jax.device_get(values)))

    return eval_loss


def _apply_update(tx: optax.GradientTransformation, grads: Any, opt_state: Any, params: Any) -> tuple[Any, Any]:
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def _keep_state(grads: Any, opt_state: Any, params: Any) -> tuple[Any, Any]:
    del grads
    return params, opt_state


def forward(model: HybridCLIP, batch: dict, *, tower_rng: jax.Array | None, head_rng: jax.Array | None,
            train: bool, text_packing: PackingPlan | None = None, mlm: bool = False) -> HybridCLIPOutput:
    """The model's output on a training batch, each side's features from its tower or, where the batch carries a
    locked tower's cached pooled output ("image_pooled", "text_pooled": training.image_cache / text_cache), from
    that cache through the head alone."""
    image_keys, text_keys = tower_keys(tower_rng, head_rng)
    if "image_pooled" in batch:
        image_features = model.project_image(batch["image_pooled"], **image_keys)
    else:
        image_features = model.encode_image(batch["pixel_values"], train=train, **image_keys)
    if "text_pooled" in batch:
        if mlm or model.config.text_inputs != 1:
            raise ValueError("text_pooled stands in for a one-input text tower without MLM")
        text_hidden, pooled = None, batch["text_pooled"]
    else:
        text_hidden, pooled = model.pool_text(batch["input_ids"], batch["attention_mask"],
                                              second_input_ids=batch.get("second_input_ids"),
                                              second_attention_mask=batch.get("second_attention_mask"),
                                              dropout_rng=text_keys["dropout_rng"], text_packing=text_packing,
                                              with_hidden=mlm)
    return model.output(image_features, model.project_text(pooled, **text_keys), text_hidden=text_hidden,
                        attention_mask=batch["attention_mask"])


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, config: StepConfig,
                    text_packing: PackingPlan | None = None) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Returns step(state, batch) -> (state, metrics), not yet jitted (the trainer jits with shardings).

    A non-finite loss or gradient skips the update (parameters and optimizer state unchanged) and is
    counted; the trainer stops after too many in a row. `text_packing` runs the text tower on the batch's
    real tokens only (a step per plan: the trainer keeps one for each it meets).
    """

    def loss_fn(params, batch_stats, batch, rng):
        if config.freeze_vision:  # no backward pass through a locked tower
            params = {**params, "vision_model": jax.lax.stop_gradient(params["vision_model"])}
        if config.freeze_text:
            params = {**params, "text_model": jax.lax.stop_gradient(params["text_model"])}
        params, alpha = losses.split_params(params)  # a learned hybrid alpha trains beside the model
        model = nnx.merge(graphdef, params, batch_stats)
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        if config.masking is not None:  # PMC-CLIP: one text pass on the masked caption serves both losses
            input_ids, attention_mask, targets = mask_batch(jax.random.fold_in(rng, MASK_STREAM), input_ids,
                                                            attention_mask, batch.get("word_start"), config.masking)
        # The heads' (projection) dropout always gets the key in training; --text_dropout governs the towers'.
        inputs = {**batch, "input_ids": input_ids, "attention_mask": attention_mask}
        out = forward(model, inputs, tower_rng=rng if config.dropout else None, head_rng=rng,
                      train=not config.freeze_bn_stats, text_packing=text_packing, mlm=config.masking is not None)
        new_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))  # what train-mode BatchNorm updated
        if config.loss.name == "sigmoid" and config.loss.sigmoid_form == "ring":  # no (global, global) logits anywhere
            if config.mesh is None:
                raise ValueError("--sigmoid_form ring passes texts around a device mesh: give StepConfig.mesh")
            bias = None if model.logit_bias is None else model.logit_bias[...]
            loss, accuracy = sigmoid_loss_ring(out.image_embeds, out.text_embeds, model.temperature_scale(), bias,
                                               config.mesh)
        else:
            loss = losses.compute_loss(out, config.loss, batch, losses.LossParams(model.temperature_scale(), alpha))
            logits = out.logits_per_text
            accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == jnp.arange(logits.shape[0]))
        extra = {} if alpha is None else {"hybrid_alpha": alpha}
        if config.masking is not None:
            mlm_loss, mlm_acc = mlm_loss_and_accuracy(out.mlm_logits, batch["input_ids"], targets)
            extra.update(contrastive_loss=loss, mlm_loss=mlm_loss, mlm_acc=mlm_acc)
            loss = loss + config.mlm_weight * mlm_loss
        return loss, (accuracy, new_stats, extra)

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, (accuracy, new_stats, extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats, batch, rng)
        # The global norm is finite exactly when every gradient is (or when their squares overflow fp32, which
        # is as good a reason to skip): one reduction that clipping and the metrics share, instead of a
        # separate isfinite pass over every gradient (0.7-1.3% of a tiny-config step on one core).
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # The update runs only when the step is finite: a conditional rather than a select between the new
        # and old value of every parameter and moment, which read and wrote the whole state once more
        # (1.4% of a tiny-config step in a CPU profile).
        new_params, new_opt_state = jax.lax.cond(finite, functools.partial(_apply_update, tx), _keep_state,
                                                 grads, state.opt_state, state.params)
        in_a_row = jnp.where(finite, 0, state.nonfinite_in_a_row + 1)
        batch_stats = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_stats, state.batch_stats)
        new_state = TrainState(step=state.step + 1, params=new_params,
                               opt_state=new_opt_state, rng=state.rng,
                               nonfinite_in_a_row=in_a_row,
                               nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
                               batch_stats=batch_stats)
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite,
                   "logit_scale": jnp.exp(state.params["logit_scale"]), "in_batch_t2i_acc": accuracy, **extra}
        return new_state, metrics

    return step


def make_embed_step(graphdef: nnx.GraphDef) -> Callable[[Any, Any, dict], tuple[jax.Array, jax.Array]]:
    """(params, batch_stats, batch) -> L2-normalised (image_embeds, text_embeds), for evaluation and indexing;
    BatchNorm uses its running statistics."""

    def embed(params, batch_stats, batch):
        model = nnx.merge(graphdef, losses.split_params(params)[0], batch_stats)
        text = model.encode_text(batch["input_ids"], batch["attention_mask"],
                                 second_input_ids=batch.get("second_input_ids"),
                                 second_attention_mask=batch.get("second_attention_mask"))
        return l2_normalize(model.encode_image(batch["pixel_values"])), l2_normalize(text)

    return embed
