"""The train step's handling of non-finite losses, the trainer's stop rule, and the JSON form of the flags."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medclip import FlaxHybridCLIP, HybridCLIPConfig
from medclip.checkpoints.model_card import render_model_card
from medclip.training import losses
from medclip.training.optim import OptimizerConfig, make_optimizer
from medclip.training.step import StepConfig, init_state, make_train_step


def _setup(config: StepConfig = StepConfig(), extra_params: dict | None = None):
    model = FlaxHybridCLIP(HybridCLIPConfig.tiny(), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    params = {**nnx.to_pure_dict(params), **(extra_params or {})}
    tx, _ = make_optimizer(params, OptimizerConfig(learning_rate=1e-3, total_steps=10, schedule="constant"))
    step = jax.jit(make_train_step(graphdef, tx, config))
    rng = np.random.default_rng(0)
    batch = {"input_ids": jnp.asarray(rng.integers(2, 90, size=(4, 8)), jnp.int32),
             "attention_mask": jnp.ones((4, 8), jnp.int32),
             "pixel_values": jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32)}
    return init_state(params, tx, 0), step, batch


def test_non_finite_step_is_skipped_and_counted():
    state, step, batch = _setup()
    state, metrics = step(state, batch)
    assert bool(metrics["finite"]) and int(state.nonfinite_in_a_row) == 0
    before = jax.tree.map(np.asarray, (state.params, state.opt_state))
    poisoned = {**batch, "pixel_values": batch["pixel_values"].at[0, 0, 0, 0].set(jnp.nan)}
    for expected in (1, 2):
        state, metrics = step(state, poisoned)
        assert not bool(metrics["finite"])
        assert int(state.nonfinite_in_a_row) == expected and int(state.nonfinite_total) == expected
    after = jax.tree.map(np.asarray, (state.params, state.opt_state))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)  # nothing moved, Adam's moments included
    state, metrics = step(state, batch)
    assert bool(metrics["finite"]) and int(state.nonfinite_in_a_row) == 0 and int(state.nonfinite_total) == 2
    assert int(state.step) == 4


def test_learned_hybrid_alpha_trains_beside_the_model():
    """--hybrid_alpha_learnable: the alpha of the report's hybrid loss is sigmoid of a scalar in the train state's
    params (started at --hybrid_alpha), updated by the optimizer, logged, and not part of the model."""
    state, step, batch = _setup(StepConfig(loss=losses.LossConfig(name="hybrid", hybrid_form="report")), losses.alpha_param(0.5))
    alphas = []
    for _ in range(3):
        state, metrics = step(state, batch)
        alphas.append(float(metrics["hybrid_alpha"]))
    assert alphas[0] == pytest.approx(0.5) and len(set(alphas)) == 3 and all(0 < a < 1 for a in alphas)
    model_params, alpha = losses.split_params(state.params)
    assert losses.ALPHA_PARAM not in model_params and float(alpha) not in alphas
    graphdef = nnx.split(FlaxHybridCLIP(HybridCLIPConfig.tiny(), rngs=nnx.Rngs(0)), nnx.Param)[0]
    nnx.merge(graphdef, model_params)  # exactly the model's parameters: what the trainer exports


def test_trainer_stops_after_too_many_non_finite_steps_in_a_row():
    from medclip.training.trainer import NonFiniteLossError, Trainer

    state, _, _ = _setup()
    trainer = Trainer.__new__(Trainer)  # only the stop rule is under test
    trainer.args = type("Args", (), {"max_nonfinite_steps": 3})()
    trainer._check_finite(state.replace(nonfinite_in_a_row=jnp.asarray(2)))
    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        trainer._check_finite(state.replace(nonfinite_in_a_row=jnp.asarray(3)))


def test_flags_from_a_json_file(tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("run_hybrid_clip", Path(__file__).parents[1] / "run_hybrid_clip.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    config = {"output_dir": str(tmp_path), "text_model_name_or_path": "allenai/scibert_scivocab_uncased",
              "vision_model_name_or_path": "openai/clip-vit-base-patch32", "do_train": True,
              "per_device_train_batch_size": 16, "learning_rate": 5e-5, "weight_decay": 0.1, "max_seq_length": 128,
              "dtype": "bfloat16", "loss": "hybrid"}
    (tmp_path / "run.json").write_text(json.dumps(config))
    model_args, data_args, train_args = script.parse([str(tmp_path / "run.json")])
    assert model_args.dtype == "bfloat16" and data_args.max_seq_length == 128
    assert train_args.per_device_train_batch_size == 16 and train_args.loss == "hybrid" and train_args.do_train
    same = script.parse(["--output_dir", str(tmp_path), "--max_seq_length", "128", "--do_train"])
    assert same[1].max_seq_length == 128 and same[2].output_dir == str(tmp_path)


def test_model_card_warns_and_reports():
    card = render_model_card(HybridCLIPConfig.tiny(), training={"steps": 10}, dataset="ROCO",
                             eval_metrics={"t2i_R@5": 0.25, "eval_loss": 1.5},
                             base_models=("openai/clip-vit-base-patch32",))
    assert card.startswith("---\nlibrary_name: medclip")
    assert card.count("Not for clinical use") == 2
    assert "| t2i_R@5 | 25.00% |" in card and "- openai/clip-vit-base-patch32" in card and "Data: ROCO" in card
