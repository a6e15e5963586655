"""Each component builds its own config from the flags (`from_args`) and checks it (`check`): every flag reaches
its field, and the checks the components own raise the messages `config_check.validate` shows users."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from medclip.evaluation.retrieval import evaluate_retrieval, metric_names
from medclip.training.arguments import ModelArguments, TrainingArguments
from medclip.training.errors import ConfigError
from medclip.training.losses import LossConfig
from medclip.training.optim import OptimizerConfig, make_optimizer
from medclip.training.plateau import Plateau, PlateauConfig
from medclip.training.step import StepConfig

# Every flag a config reads, set to a value other than its default, so a field left to its default fails.
FLAGS = {"loss": "hybrid", "hybrid_alpha": 0.25, "hybrid_temperature": 0.5, "hybrid_form": "report",
         "hybrid_alpha_learnable": True, "concept_target_weight": 0.75, "false_negatives": "mask",
         "learning_rate": 3e-4, "warmup_steps": 7, "lr_schedule": "constant", "weight_decay": 0.2,
         "weight_decay_type": "l2", "weight_decay_mask": "ndim", "adam_beta1": 0.8, "adam_beta2": 0.99,
         "adam_epsilon": 1e-6, "max_grad_norm": 2.0, "gradient_accumulation_steps": 4, "vision_learning_rate": 1e-5,
         "text_learning_rate": 2e-5, "freeze_vision": True, "freeze_text": True, "freeze_bn_stats": True,
         "reduce_lr_on_plateau": True, "plateau_metric": "t2i_R@5", "plateau_factor": 0.5, "plateau_patience": 3,
         "plateau_threshold": 0.01, "plateau_threshold_mode": "abs", "plateau_cooldown": 2, "plateau_min_lr": 1e-7,
         "mlm_weight": 0.5, "sigmoid_form": "ring"}
# config field -> flag, where the names differ
RENAMED = {"name": "loss", "schedule": "lr_schedule", "lr_multiplier": "reduce_lr_on_plateau",
           "metric": "plateau_metric", **{f: f"plateau_{f}" for f in ("factor", "patience", "threshold",
                                                                       "threshold_mode", "cooldown", "min_lr")}}


def _args(**changes) -> TrainingArguments:
    return TrainingArguments(output_dir="out", **{**FLAGS, **changes})


def _assert_reads_every_flag(config, args, derived=()):
    for f in dataclasses.fields(config):
        if f.name in derived:
            continue
        flag = RENAMED.get(f.name, f.name)
        assert getattr(config, f.name) == getattr(args, flag), f.name
        assert getattr(args, flag) != f.default, f"{flag}: give it a non-default value in FLAGS"


def test_each_config_reads_every_flag_it_holds():
    args = _args()
    loss = LossConfig.from_args(args)
    _assert_reads_every_flag(loss, args)
    optimizer = OptimizerConfig.from_args(args, steps=100)
    _assert_reads_every_flag(optimizer, args, derived=("total_steps",))
    assert optimizer.total_steps == 25  # optimizer updates: 100 batches / 4 accumulated
    assert OptimizerConfig.from_args(_args(max_grad_norm=0.0)).max_grad_norm is None  # 0: no clipping
    plateau = PlateauConfig.from_args(args)
    _assert_reads_every_flag(plateau, args, derived=("mode",))
    assert plateau.mode == "max" and PlateauConfig.from_args(_args(plateau_metric="eval_loss")).mode == "min"
    step = StepConfig.from_args(ModelArguments(text_dropout=False), args, tokenizer=None)
    assert step.loss == loss and step.masking is None  # no --mlm: no tokenizer needed
    assert (step.dropout, step.freeze_vision, step.freeze_text, step.freeze_bn_stats, step.mlm_weight) == (
        False, True, True, True, 0.5)


@pytest.mark.parametrize("config, message", [
    (LossConfig(name="focal"), "--loss 'focal' is unknown; choose from clip, hybrid, sigmoid, concept"),
    (LossConfig(name="hybrid", hybrid_form="paper"), "--hybrid_form 'paper' is unknown"),
    (LossConfig(name="concept", false_negatives="drop"), "--false_negatives 'drop' is unknown"),
    (LossConfig(name="hybrid", hybrid_form="report", hybrid_temperature=0.5), "--hybrid_temperature sets"),
    (LossConfig(hybrid_alpha_learnable=True), "--hybrid_alpha_learnable learns the alpha of --loss hybrid"),
    (LossConfig(name="hybrid", hybrid_alpha_learnable=True, hybrid_alpha=1.0), "--hybrid_alpha_learnable starts"),
    (OptimizerConfig(schedule="step"), "--lr_schedule 'step' is unknown"),
    (OptimizerConfig(weight_decay_type="l1"), "--weight_decay_type 'l1' is unknown"),
    (OptimizerConfig(weight_decay_mask="biases"), "--weight_decay_mask 'biases' is unknown"),
    (OptimizerConfig(freeze_vision=True, freeze_text=True), "--freeze_vision and --freeze_text together"),
    (OptimizerConfig(lr_multiplier=True), "--reduce_lr_on_plateau needs --lr_schedule constant"),
    (PlateauConfig(metric="eval_accuracy"), "--plateau_metric 'eval_accuracy' is not an eval metric"),
    (PlateauConfig(threshold_mode="ratio"), "--plateau_threshold_mode 'ratio' is unknown"),
])
def test_each_config_checks_its_own_settings(config, message):
    with pytest.raises(ConfigError, match="^" + message):
        config.check()


def test_the_components_refuse_what_their_check_refuses():
    """The library entry points run the same check (one message), not a second one of their own."""
    with pytest.raises(ConfigError, match="^--weight_decay_mask 'biases' is unknown"):
        make_optimizer({"w": np.zeros((2, 2))}, OptimizerConfig(weight_decay_mask="biases"))
    with pytest.raises(ConfigError, match="^--plateau_threshold_mode 'ratio' is unknown"):
        Plateau(PlateauConfig(threshold_mode="ratio"), 0.1)
    assert [LossConfig(name=n).check() for n in ("clip", "hybrid", "sigmoid", "concept")] == [None] * 4


def test_declared_metric_names_are_what_retrieval_computes():
    rng = np.random.default_rng(0)
    embeds = rng.normal(size=(6, 4)).astype(np.float32)
    embeds /= np.linalg.norm(embeds, axis=1, keepdims=True)
    captions = ["a", "b", "a", "c", "d", "d"]
    assert list(evaluate_retrieval(embeds, embeds).metrics) == metric_names()
    everything = ("i2t", "t2i", "t2t", "i2i")
    result = evaluate_retrieval(embeds, embeds, captions, directions=everything, ks=(1, 3))
    assert list(result.metrics) == metric_names(everything, ks=(1, 3))


def test_check_model_is_one_set_of_checks_before_and_after_loading(tmp_path):
    """validate runs check_model on what a local config.json says; the trainer runs it on the loaded model
    (a Hub id): the same messages either way."""
    from flax import nnx

    from medclip import FlaxHybridCLIP, HybridCLIPConfig
    from medclip.training.arguments import DataArguments
    from medclip.training.config_check import ModelFacts, check_model, starting_model

    config = HybridCLIPConfig.tiny()
    saved = tmp_path / "one"
    FlaxHybridCLIP(config, rngs=nnx.Rngs(0)).save_pretrained(saved)
    model, two = ModelArguments(model_name_or_path=str(saved)), DataArguments(second_text_field="keywords")
    before, after = starting_model(model, two), ModelFacts.of(config, str(saved))
    assert before == after and (after.has_logit_bias, after.text_inputs, after.clip_text) == (False, 1, False)
    assert starting_model(ModelArguments(model_name_or_path="org/hub-model"), two) is None  # known after loading
    for flags, message in (({"loss": "sigmoid"}, "--loss sigmoid needs a learned logit bias, and " + str(saved)),
                           ({}, "--second_text_field keywords needs a model with two text inputs")):
        with pytest.raises(ConfigError, match="^" + message):
            check_model(model, two, TrainingArguments(output_dir="out", **flags), after)
    biased = ModelFacts.of(config.replace(logit_bias_init_value=-10.0, text_inputs=2), "m")
    check_model(model, two, TrainingArguments(output_dir="out", loss="sigmoid"), biased)  # both satisfied
    towers = starting_model(ModelArguments(logit_bias_init=-10.0), two)
    assert towers.has_logit_bias and towers.text_inputs == 2  # built by the run as the flags say
    assert not starting_model(ModelArguments(model_preset="demo", logit_bias_init=-10.0), DataArguments()).has_logit_bias
