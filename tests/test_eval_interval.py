"""--eval_epochs: evaluation every N epochs and after the last step, through the real trainer."""

from __future__ import annotations

import json

import pytest

from medclip.data import synthetic
from medclip.training.arguments import DataArguments, ModelArguments, TrainingArguments
from medclip.training.config_check import ConfigError, validate
from medclip.training.trainer import train


def test_evaluates_every_n_epochs_and_at_the_end(tmp_path):
    train_file = synthetic.write_synthetic_dataset(tmp_path / "t", 16, seed=0, image_size=32, name="train")
    valid_file = synthetic.write_synthetic_dataset(tmp_path / "v", 8, seed=1, image_size=32, name="valid")
    out = tmp_path / "out"
    summary = train(ModelArguments(model_preset="demo", image_size=32),
                    DataArguments(train_file=str(train_file), validation_file=str(valid_file), max_seq_length=16),
                    TrainingArguments(output_dir=str(out), do_train=True, num_train_epochs=3, eval_epochs=2,
                                      per_device_train_batch_size=8, per_device_eval_batch_size=8,
                                      report_to="none", logging_steps=1, text_packing_sizes=0,
                                      early_stopping_patience=0))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 6
    assert [r["step"] for r in rows if "eval_loss" in r] == [4, 6]  # after epoch 2, then the last step (epoch 3)


def test_eval_interval_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="--eval_epochs"):
        validate(ModelArguments(model_preset="demo"), DataArguments(),
                 TrainingArguments(output_dir=str(tmp_path), do_train=True, eval_epochs=0))
