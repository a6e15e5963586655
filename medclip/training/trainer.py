"""The training loop: data-parallel steps on a device mesh, checkpoints with exact resume, evaluation each
epoch, best-model export and early stopping. `run_hybrid_clip.py` only parses flags and calls `train`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from medclip import storage
from medclip.data.fields import Field, ImageFeatures, cached_text, word_start
from medclip.data.pipeline import Captions
from medclip.data.records import Record
from medclip.hybrid_clip import FlaxHybridCLIP
from medclip.models.packing import PackingPlan, plan_packing
from medclip.training import mesh as mesh_lib
from medclip.training.distributed import barrier
from medclip.training.arguments import DataArguments, ModelArguments, TrainingArguments
from medclip.training.checkpointing import Checkpointer
from medclip.training import export
from medclip.training.config_check import ConfigError, ModelFacts, check_model, metric_key, model_name, validate
from medclip.training.data_feed import (DataFeed, PreparedSources, build_data, image_settings, streams_train,
                                       write_data_report)
from medclip.training.locations import check_locations, prepare_output_dir
from medclip.training.logger import MetricsLogger, truncate_jsonl
from medclip.training.losses import alpha_param, split_params
from medclip.training.mlm import word_starts
from medclip.training.image_cache import pooled_image_features
from medclip.training.image_cache import why_not_cacheable as why_not_image_cacheable
from medclip.training.text_cache import pooled_text_features, why_not_cacheable
from medclip.training.model_setup import build_model_and_tokenizer, compute_dtype
from medclip.training.optim import OptimizerConfig, make_optimizer, set_lr_scale
from medclip.training.phase_times import PhaseTimer, table
from medclip.training.plateau import Plateau, PlateauConfig, mode_for
from medclip.training.step import (StepConfig, TrainState, init_state, make_embed_step, make_eval_loss,
                                   make_train_step)

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


@dataclasses.dataclass
class Progress:
    """Saved with every checkpoint (with the data iterator's state) so a resumed run continues exactly."""

    best_metric: float | None = None
    best_epoch: int | None = None
    epochs_without_improvement: int = 0
    stopped_early: bool = False
    plateau: dict[str, Any] | None = None  # ReduceLROnPlateau's state (medclip.training.plateau.PlateauState)


def _is_better(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if mode_for(metric) == "min" else value > best




def _may_cache(tower: str, mode: str, reason: str | None, frozen: bool) -> bool:
    """--cache_locked_{tower} auto / on, given why the locked tower cannot be cached (None: it can): an error for
    `on`, a log line for `auto` when the tower is frozen but not cacheable."""
    if reason is None:
        return True
    if mode == "on":
        raise ConfigError(f"--cache_locked_{tower} on: cannot cache the {tower} tower: {reason}")
    if frozen:
        logger.info("the locked %s tower runs every step: %s", tower, reason)
    return False


class Trainer:
    """Expects flags that `config_check.validate` accepted (`train()` below validates; so does the script).
    `phases`: the run's phase timer (the script's, holding its start-up); default a new one from now."""

    def __init__(self, model_args: ModelArguments, data_args: DataArguments, train_args: TrainingArguments,
                 phases: PhaseTimer | None = None):
        self.phases = phases if phases is not None else PhaseTimer()
        with self.phases.phase("model build"):  # data loading inside it is charged to its own phases
            self._set_up(model_args, data_args, train_args)

    def _set_up(self, model_args: ModelArguments, data_args: DataArguments, train_args: TrainingArguments) -> None:
        self.model_args, self.data_args, self.args = model_args, data_args, train_args
        check_locations(model_args, data_args, train_args)
        self.output_dir = prepare_output_dir(train_args)
        self.mesh = mesh_lib.make_mesh()
        platform = self.mesh.devices.flat[0].platform
        self.compute_dtype = compute_dtype(model_args.dtype, platform)
        logger.info("devices: %s", mesh_lib.describe(self.mesh))
        logger.info("compute dtype %s (--dtype %s on %s), parameters float32", jnp.dtype(self.compute_dtype).name,
                    model_args.dtype, platform)
        self.model, self.tokenizer = build_model_and_tokenizer(model_args, data_args, self.compute_dtype,
                                                               train_args.seed, self.output_dir, mlm=train_args.mlm)
        # What validate could not know before loading (a Hub model), now from the model itself.
        check_model(model_args, data_args, train_args, ModelFacts.of(self.model.config, model_name(model_args)))
        self.text_cached = self.image_cached = False  # set by _train_fields
        self.prepared_sources = PreparedSources()  # asked once per source (a request each on a bucket)
        with self.phases.phase("data loading"):
            self.data: DataFeed = build_data(data_args, train_args, self.tokenizer, self.model.config,
                                             self.output_dir, num_devices=jax.device_count(),
                                             train_fields=self._train_fields, prepared=self.prepared_sources,
                                             phases=self.phases)
        self.graphdef, params, batch_stats = nnx.split(self.model, nnx.Param, nnx.BatchStat)
        self.params, self.batch_stats = nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)
        if train_args.hybrid_alpha_learnable:  # trained beside the model, not exported with it
            self.params.update(alpha_param(train_args.hybrid_alpha))
        steps_per_epoch = self.data.steps_per_epoch if self.data.has_train else 0
        self.total_steps = (train_args.max_steps if train_args.max_steps > 0
                            else math.ceil(train_args.num_train_epochs * max(steps_per_epoch, 1)))
        self.optimizer_config = OptimizerConfig.from_args(train_args, self.total_steps)
        self.tx, self.schedules = make_optimizer(self.params, self.optimizer_config)
        self.step_config = StepConfig.from_args(model_args, train_args, self.tokenizer, mesh=self.mesh)
        self.eval_loss = make_eval_loss(self.step_config.loss, self.model.config.clamp_logit_scale)
        self.plateau_config = PlateauConfig.from_args(train_args) if train_args.reduce_lr_on_plateau else None
        self.lr_scale = 1.0  # the plateau's multiplier, for logging (the step reads it from the optimizer state)
        self.checkpointer = Checkpointer(self.output_dir / "checkpoints", max_to_keep=train_args.save_total_limit)
        self.metrics = MetricsLogger(self.output_dir, train_args.report_to,
                                     run_config={**dataclasses.asdict(model_args), **dataclasses.asdict(data_args),
                                                 **dataclasses.asdict(train_args)})
        self._compile()

    # -- set-up --------------------------------------------------------------------------------------------
    def _compile(self) -> None:
        abstract = jax.eval_shape(lambda p, s: init_state(p, self.tx, self.args.seed, s), self.params,
                                  self.batch_stats)
        shardings = mesh_lib.state_shardings(self.mesh, abstract, self.args.fully_sharded)
        # Running statistics are small and every device normalises with them: replicated, also under FSDP.
        self.state_shardings = shardings.replace(batch_stats=jax.tree.map(
            lambda _: mesh_lib.replicated(self.mesh), shardings.batch_stats))
        batch_sharding = mesh_lib.batch_sharding(self.mesh)
        self.abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                           abstract, self.state_shardings)
        self._train_steps: dict[PackingPlan | None, Any] = {}
        self.embed_step = jax.jit(make_embed_step(self.graphdef),
                                  in_shardings=(self.state_shardings.params, self.state_shardings.batch_stats,
                                                batch_sharding))
        self._set_lr_scale = jax.jit(
            lambda state, scale: state.replace(opt_state=set_lr_scale(state.opt_state, scale.astype(jnp.float32))),
            in_shardings=(self.state_shardings, None), out_shardings=self.state_shardings, donate_argnums=0)

    def train_step(self, state: TrainState, batch: dict[str, np.ndarray]) -> tuple[TrainState, dict]:
        """One step on this process's rows, jitted once per text-packing plan (at most --text_packing_sizes)."""
        plan = self._packing_plan(batch["attention_mask"])
        if plan not in self._train_steps:
            if self._train_steps:
                logger.info("compiling the train step for text packing %s", plan)
            self._train_steps[plan] = jax.jit(
                make_train_step(self.graphdef, self.tx, self.step_config, plan),
                in_shardings=(self.state_shardings, mesh_lib.batch_sharding(self.mesh)),
                out_shardings=(self.state_shardings, mesh_lib.replicated(self.mesh)), donate_argnums=0)
        return self._train_steps[plan](state, mesh_lib.global_batch(self.mesh, batch))

    def _train_fields(self, items: list[Record], captions: Captions) -> list[Field]:
        """What the training batches carry beyond pixels and captions, computed from the model and the training
        records before the feed is built: locked towers' cached features, whole-word flags."""
        fields = []
        with self.phases.phase("locked-tower cache"):
            pooled = self._cache_locked_text(captions)
        if pooled is not None:
            fields.append(cached_text(pooled))
        if self.args.mlm and self.args.mlm_masking == "whole_word":
            with self.phases.phase("tokenization"):
                fields.append(word_start(self._word_starts(items, captions)))
        with self.phases.phase("locked-tower cache"):
            features = self._cache_locked_image(items)
        if features is not None:
            fields.append(features.field())
        self.text_cached, self.image_cached = pooled is not None, features is not None
        return fields

    def _cache_locked_text(self, captions: Captions) -> np.ndarray | None:
        """--cache_locked_text: the frozen text tower's pooled output of every training caption, computed once
        (medclip.training.text_cache); the batches then carry it and the step skips the tower."""
        if self.args.cache_locked_text == "off":
            return None
        reason = why_not_cacheable(self.model.config, freeze_text=self.args.freeze_text,
                                   text_dropout=self.model_args.text_dropout, mlm=self.args.mlm)
        if not _may_cache("text", self.args.cache_locked_text, reason, self.args.freeze_text):
            return None
        pooled = pooled_text_features(self.model, captions.input_ids, captions.attention_mask,
                                      progress=jax.process_index() == 0)
        logger.info("locked text tower cached: %d captions x %d, computed once", *pooled.shape)
        return pooled

    def _word_starts(self, items: list[Record], captions: Captions) -> np.ndarray:
        """--mlm_masking whole_word: which token starts each caption's words, once per caption (mlm.word_starts)."""
        texts = [caption for record in items for caption in record.captions]
        try:
            return word_starts(self.tokenizer, texts, captions.input_ids)
        except ValueError as error:
            raise ConfigError(f"--mlm_masking whole_word: {error}") from None

    def _cache_locked_image(self, items: list[Record]) -> ImageFeatures | None:
        """--cache_locked_image: the frozen image tower's pooled output of every training image, computed once
        (medclip.training.image_cache); the batches then carry it, the pipeline decodes no images and the step
        skips the tower."""
        if self.args.cache_locked_image == "off":
            return None
        reason = why_not_image_cacheable(self.model, freeze_vision=self.args.freeze_vision,
                                         train_crop=self.data_args.train_crop, hflip=self.data_args.hflip,
                                         dropout=self.model_args.text_dropout,
                                         freeze_bn_stats=self.args.freeze_bn_stats)
        if reason is None and streams_train(self.data_args, self.prepared_sources):
            reason = "the training images stream from sharded records (medclip.data.shards)"
        if not _may_cache("image", self.args.cache_locked_image, reason, self.args.freeze_vision):
            return None
        image = image_settings(self.data_args, self.model.config)
        cached = pooled_image_features(self.model, items, image_size=image.size, preprocess=image.preprocess,
                                       threads=self.data_args.preprocessing_num_workers,
                                       progress=jax.process_index() == 0)
        undecoded = int((~cached.valid).sum())
        logger.info("locked image tower cached: %d images x %d, computed once%s", *cached.features.shape,
                    f"; {undecoded} did not decode and are skipped (counted when training reaches them)"
                    if undecoded else "")
        return cached

    def _packing_plan(self, attention_mask: np.ndarray) -> PackingPlan | None:
        # Every process must compile the same program, and each sees only its own rows: multi-host runs
        # keep the padded layout rather than agree on a plan every step. A cached text tower has nothing to pack;
        # a model that attends to its padding (PMC-CLIP's mask_padding false) must see it.
        if jax.process_count() > 1 or self.text_cached or not self.model.config.text_preprocess.mask_padding:
            return None
        return plan_packing(attention_mask, groups=jax.device_count(), sizes=self.args.text_packing_sizes)

    def _initial_state(self) -> tuple[TrainState, Progress]:
        if self.args.resume and self.checkpointer.latest_step() is not None:
            state, meta = self.checkpointer.restore(self.abstract_state)
            if self.data.has_train:
                self.data.restore_train(meta["data"])
            logger.info("resumed from step %d", int(state.step))
            self.metrics.truncate_after(int(state.step))
            truncate_jsonl(self.output_dir / f"data_order.process{jax.process_index()}.jsonl", int(state.step))
            return state, Progress(**meta["progress"])
        init = jax.jit(lambda p, s: init_state(p, self.tx, self.args.seed, s), out_shardings=self.state_shardings)
        return init(self.params, self.batch_stats), Progress()

    def _save(self, step: int, state: TrainState, progress: Progress) -> None:
        barrier(f"save {step}")  # process 0 may still be writing an export
        self.checkpointer.save(step, state, {"progress": dataclasses.asdict(progress),
                                             "data": self.data.train_state()})

    # -- the loop ------------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        args, phases = self.args, self.phases
        with phases.phase("first step"):  # the state's initialisation (or restore) and the step's compilation
            state, progress = self._initial_state()
        step = int(state.step)
        first = True
        barrier("train start")
        steps_per_epoch = self.data.steps_per_epoch
        global_batch = self.data.global_train_batch_size
        plateau = None
        if self.plateau_config is not None:
            plateau = Plateau(self.plateau_config, args.learning_rate, progress.plateau)
            self.lr_scale = plateau.state.lr / args.learning_rate
        summary: dict[str, Any] = {}
        bar = tqdm(total=self.total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                   disable=jax.process_index() != 0)
        last_time, last_step = time.perf_counter(), step
        while step < self.total_steps and not progress.stopped_early:
            start = self.data.train.position
            with phases.phase("data wait"):  # the first call also builds and starts the input pipeline
                try:
                    batch = next(self.data.train)
                except Exception:  # a data error met mid-run (a corrupt shard): its one line goes below the bar
                    bar.close()
                    raise
            # The step's own time ends where the loop already syncs on its output (_check_finite, logging).
            with phases.phase("first step" if first else "step"):
                state, metrics = self.train_step(state, batch)
                first = False
                step += 1
                if args.log_data_order:
                    self._log_data_order(step, self.data.train_ids(start, self.data.train.position))
                bar.update(1)
                epoch = (step - 1) // steps_per_epoch
                if step % args.logging_steps == 0 or step == self.total_steps:
                    now = time.perf_counter()
                    rate = (step - last_step) * global_batch / (now - last_time)
                    last_time, last_step = now, step
                    logged = self._log_train(step, epoch, metrics, rate)
                    bar.set_postfix(loss=f"{logged['train_loss']:.4f}", pairs_per_s=f"{rate:.1f}")
                self._check_finite(state)
            end_of_epoch = step % steps_per_epoch == 0 or step == self.total_steps
            evaluate = step == self.total_steps or (end_of_epoch and (epoch + 1) % args.eval_epochs == 0)
            if evaluate and self.data.has_eval:
                with phases.phase("evaluation"):
                    summary["eval"] = self.evaluate(state, step, epoch)
                    with phases.phase("export"):  # a new best model is exported
                        self._track_best(state, summary["eval"], progress, epoch)
                    if plateau is not None:
                        state = self._step_plateau(plateau, state, summary["eval"], progress)
                last_time = time.perf_counter()  # evaluation time is not training throughput
            if end_of_epoch or (args.save_steps > 0 and step % args.save_steps == 0):
                with phases.phase("checkpoint save"):
                    self._save(step, state, progress)
        bar.close()
        self._check_finite(state, final=True)
        with phases.phase("export"):
            summary.update(self._export_final(state, summary.get("eval")))
        summary.update(steps=step, text_tower_cached=self.text_cached,
                       image_tower_cached=self.image_cached, nonfinite_steps_skipped=int(state.nonfinite_total),
                       stopped_early=progress.stopped_early, best_metric=progress.best_metric,
                       best_epoch=progress.best_epoch, dropped=self.data.drop_summary)
        write_data_report(self.data, self.output_dir)
        self._log_phases(step)
        self.metrics.close()
        self.checkpointer.close()
        return summary

    def _log_phases(self, step: int) -> None:
        """The run's phase times, once: a `phases` record in metrics.jsonl and a table in the log (process 0)."""
        record = self.phases.record()
        self.metrics.log(step, record)
        if jax.process_index() == 0:
            logger.info("where the time went (process CPU includes the input pipeline's threads):\n%s",
                        table(record))

    def _step_plateau(self, plateau: Plateau, state: TrainState, metrics: dict, progress: Progress) -> TrainState:
        """ReduceLROnPlateau after an evaluation: the new rate goes into the optimizer state (both checkpointed)."""
        before = plateau.state.lr
        lr = plateau.step(metrics[metric_key(self.args.plateau_metric)])
        progress.plateau = plateau.to_dict()
        if lr != before:
            logger.info("%s plateaued: learning rate %.3g -> %.3g", self.args.plateau_metric, before, lr)
        self.lr_scale = lr / self.args.learning_rate
        return self._set_lr_scale(state, np.float32(self.lr_scale))

    def evaluate_only(self) -> dict[str, Any]:
        """--do_eval without --do_train: the starting (or latest checkpointed) model on the validation set."""
        if not self.data.has_eval:
            raise ConfigError("--do_eval needs --validation_file, --data_dir or synthetic validation data")
        state, progress = self._initial_state()
        return {"eval": self.evaluate(state, int(state.step), int(state.step) // max(self.data.steps_per_epoch, 1)),
                "dropped": self.data.drop_summary}

    def _log_data_order(self, step: int, ids: list[str]) -> None:
        storage.append_text(self.output_dir / f"data_order.process{jax.process_index()}.jsonl",
                            json.dumps({"step": step, "ids": ids}) + "\n")

    def _log_train(self, step: int, epoch: int, metrics: dict, rate: float) -> dict[str, float]:
        fetched = {f"train_{k}": float(v) for k, v in jax.device_get(metrics).items()}
        fetched["learning_rate"] = self.lr_scale * float(
            self.schedules["head"](step // self.args.gradient_accumulation_steps))
        fetched["pairs_per_s"] = rate
        fetched["epoch"] = epoch
        self.metrics.log(step, fetched)
        return fetched

    def _check_finite(self, state: TrainState, final: bool = False) -> None:
        in_a_row = int(state.nonfinite_in_a_row) if final or self.args.max_nonfinite_steps else 0
        if in_a_row >= max(self.args.max_nonfinite_steps, 1):
            raise NonFiniteLossError(
                f"{in_a_row} steps in a row had a non-finite loss or gradient (updates skipped); stopping. "
                "Lower --learning_rate, raise --warmup_steps, or use --dtype float32.")

    # -- evaluation and export -----------------------------------------------------------------------------
    def embed_eval_set(self, state: TrainState) -> tuple[np.ndarray, np.ndarray]:
        images, texts = [], []
        for batch in self.data.eval_batches():
            mask = batch.pop("mask")
            image_embeds, text_embeds = self.embed_step(state.params, state.batch_stats,
                                                        mesh_lib.global_batch(self.mesh, batch))
            mask = multihost_utils.process_allgather(mask, tiled=True) if jax.process_count() > 1 else mask
            image_embeds = multihost_utils.process_allgather(image_embeds, tiled=True)
            text_embeds = multihost_utils.process_allgather(text_embeds, tiled=True)
            images.append(np.asarray(image_embeds)[mask])
            texts.append(np.asarray(text_embeds)[mask])
        return np.concatenate(images), np.concatenate(texts)

    def evaluate(self, state: TrainState, step: int, epoch: int) -> dict[str, float]:
        from medclip.evaluation.retrieval import evaluate_retrieval

        barrier(f"evaluate {step}")

        image_embeds, text_embeds = self.embed_eval_set(state)
        captions = self.data.eval_captions
        if len(captions) != len(image_embeds):
            raise RuntimeError(f"evaluation saw {len(image_embeds)} examples but the split has {len(captions)}")
        result = evaluate_retrieval(image_embeds, text_embeds, captions)
        # The training loss (the same function), in batches of the global train batch: comparable to train_loss.
        eval_loss = self.eval_loss(image_embeds, text_embeds, state.params, self.data.global_train_batch_size,
                                   self.data.eval_loss_fields)
        metrics = {"eval_loss": eval_loss,
                   **{f"eval_{k}": v for k, v in result.metrics.items()}, "epoch": epoch,
                   "eval_examples": len(image_embeds)}
        self.metrics.log(step, metrics)
        logger.info("epoch %d eval: %s", epoch, {k: round(v, 4) for k, v in metrics.items()})
        return metrics

    def _model(self, state: TrainState) -> FlaxHybridCLIP:
        """A host copy of the model (parameters and running statistics). Collective when parameters are sharded
        across processes: every process must call it, whichever one then writes."""
        variables = (split_params(state.params)[0], state.batch_stats)
        if all(leaf.is_fully_addressable for leaf in jax.tree.leaves(variables)):
            host = jax.device_get(variables)
        else:
            host = multihost_utils.process_allgather(variables, tiled=True)
        return nnx.merge(self.graphdef, *host)

    def _track_best(self, state: TrainState, metrics: dict, progress: Progress, epoch: int) -> None:
        """Exports each new best model to output_dir/best; sets `stopped_early` when patience runs out."""
        name = metric_key(self.args.metric_for_best_model)  # one of eval_metrics.EVAL_METRICS (validate)
        value = metrics[name]
        if _is_better(name, value, progress.best_metric):
            progress.best_metric, progress.best_epoch, progress.epochs_without_improvement = value, epoch, 0
            model = self._model(state)
            if jax.process_index() == 0:
                export.save_best(model, self.output_dir, self.tokenizer)
            return
        progress.epochs_without_improvement += 1
        patience = self.args.early_stopping_patience
        if patience and progress.epochs_without_improvement >= patience:
            logger.info("early stopping: %s has not improved for %d epochs", name, patience)
            progress.stopped_early = True

    def _model_card(self, eval_metrics: dict[str, float] | None) -> str:
        return export.model_card(self.model, self.model_args, self.data_args, self.args,
                                 total_steps=self.total_steps, global_batch=self.data.global_train_batch_size,
                                 eval_metrics=eval_metrics, compute_dtype=jnp.dtype(self.compute_dtype).name)

    def _export_final(self, state: TrainState, eval_metrics: dict[str, float] | None) -> dict[str, Any]:
        """Final model (and its card, curves) in output_dir; best model in output_dir/best; optional push."""
        final = self._model(state)
        if jax.process_index() != 0:
            return {}
        return export.export_final(final, self.output_dir, self.tokenizer, self._model_card(eval_metrics), self.args)


def train(model_args: ModelArguments, data_args: DataArguments, train_args: TrainingArguments,
          phases: PhaseTimer | None = None) -> dict[str, Any]:
    validate(model_args, data_args, train_args)
    return Trainer(model_args, data_args, train_args, phases).train()
