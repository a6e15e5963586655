"""--loss concept through the real trainer: the batches carry concept ids and caption groups, the step and
eval_loss read them, and data_report.json counts the concept sets cut to --concept_width."""

from __future__ import annotations

import json

import numpy as np

from medclip.data import synthetic
from medclip.training.arguments import DataArguments, ModelArguments, TrainingArguments
from medclip.training.trainer import train


def with_concepts(path):
    """The synthetic pairs' keywords (modality, region, finding) as their concept sets (beside the images)."""
    out = path.with_name("with_concepts.jsonl")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    out.write_text("".join(json.dumps({**line, "concepts": line["keywords"]}) + "\n" for line in lines))
    return out


def test_concept_loss_trains_and_evaluates(tmp_path):
    train_file = with_concepts(synthetic.write_synthetic_dataset(tmp_path / "t", 32, seed=0, image_size=32,
                                                                 name="train"))
    valid_file = with_concepts(synthetic.write_synthetic_dataset(tmp_path / "v", 16, seed=1, image_size=32,
                                                                 name="valid"))
    summary = train(ModelArguments(model_preset="demo", image_size=32),
                    DataArguments(train_file=str(train_file), validation_file=str(valid_file), concept_width=2,
                                  max_seq_length=16),
                    TrainingArguments(output_dir=str(tmp_path / "out"), do_train=True, max_steps=4,
                                      per_device_train_batch_size=8, per_device_eval_batch_size=8,
                                      learning_rate=1e-3, loss="concept", false_negatives="mask",
                                      report_to="none", logging_steps=1, text_packing_sizes=0))
    assert summary["steps"] == 4 and summary["nonfinite_steps_skipped"] == 0
    assert np.isfinite(summary["eval"]["eval_loss"])
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert report["train"]["changed"]["concept_set_truncated"] > 0  # three keywords, width 2
