"""What the reference systems' training loops do, through one real (in-process) run of the trainer: early
stopping stops at the right evaluation and `best/` holds the best evaluation's model (PubMedCLIP: patience 5 on
its validation metric); `--report_to wandb` offline writes a run folder with the metrics (the source's logger);
`--push_to_hub` uploads the best model with its card and tokenizer (no network: the Hub API is replaced by a
recorder, as tests/test_hub.py does for `model.push_to_hub`). The run trains with the CLIP-TF report's hybrid
loss (--hybrid_form report), so its evaluation path is exercised too."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest

from medclip import FlaxHybridCLIP
from medclip.data import synthetic
from medclip.training.arguments import DataArguments, ModelArguments, TrainingArguments
from medclip.training.config_check import validate
from medclip.training.trainer import Trainer, train
from tests.test_hub import RecordingApi

PATIENCE = 2
# R@10 among 8 validation pairs is always 1: the first evaluation is the best and every later one ties it
# without improving, so the run must stop at evaluation PATIENCE + 1 whatever training does, while the model
# keeps changing (best/ and the final model differ).
METRIC = "eval_t2i_R@10"
HAS_WANDB = importlib.util.find_spec("wandb") is not None


def _data(tmp: Path) -> DataArguments:
    train_file = synthetic.write_synthetic_dataset(tmp / "t", 16, seed=0, image_size=32, name="train")
    valid_file = synthetic.write_synthetic_dataset(tmp / "v", 8, seed=1, image_size=32, name="valid")
    return DataArguments(train_file=str(train_file), validation_file=str(valid_file), max_seq_length=16)


def _train_args(out: Path, **changes) -> TrainingArguments:
    return TrainingArguments(output_dir=str(out), per_device_train_batch_size=8, per_device_eval_batch_size=8,
                             logging_steps=1, text_packing_sizes=0, save_steps=0, **changes)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("protocols")
    out = tmp / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        patch.setattr(huggingface_hub, "HfApi", RecordingApi)
        summary = train(ModelArguments(model_preset="demo", image_size=32), _data(tmp),
                        _train_args(out, do_train=True, do_eval=True, num_train_epochs=12, learning_rate=5e-3,
                                    early_stopping_patience=PATIENCE, metric_for_best_model=METRIC,
                                    loss="hybrid", hybrid_form="report",
                                    report_to="wandb" if HAS_WANDB else "none",
                                    push_to_hub=True, hub_model_id="someone/medclip-protocols"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return tmp, out, summary, rows


def _evaluate(tmp: Path, model: Path, name: str) -> dict:
    """The saved model on the same validation set, as `--do_eval` without `--do_train` evaluates it."""
    args = (ModelArguments(model_name_or_path=str(model)), _data(tmp / name),
            _train_args(tmp / name / "out", do_eval=True, report_to="none", loss="hybrid", hybrid_form="report"))
    validate(*args)
    return Trainer(*args).evaluate_only()["eval"]


@pytest.mark.heavy
def test_early_stopping_stops_at_the_right_evaluation_exports_and_pushes_the_best_model(run):
    tmp, out, summary, rows = run
    evals = [r for r in rows if "eval_loss" in r]
    # The rule, transcribed: a new best resets the count; `PATIENCE` evaluations in a row without one stop.
    best, best_index, bad, stop = None, None, 0, None
    for i, row in enumerate(evals):
        if best is None or row[METRIC] > best:
            best, best_index, bad = row[METRIC], i, 0
        else:
            bad += 1
            if bad >= PATIENCE:
                stop = i
                break
    assert stop == PATIENCE, [r[METRIC] for r in evals]
    assert summary["stopped_early"] and len(evals) == stop + 1
    assert summary["steps"] == 2 * (stop + 1) < 24  # 2 steps an epoch, fewer than the 12 epochs asked
    assert summary["best_epoch"] == evals[best_index]["epoch"] and summary["best_metric"] == best
    # best/ is the best evaluation's model, the output folder the last one's: re-evaluated, each reproduces its
    # evaluation's metrics, and the two evaluations differ, so the check tells the models apart.
    metrics = [k for k in evals[-1] if k.startswith("eval_") and k != "eval_examples"]
    for folder, name, row in ((out / "best", "best", evals[best_index]), (out, "final", evals[-1])):
        again = _evaluate(tmp, folder, name)
        assert {k: again[k] for k in metrics} == pytest.approx({k: row[k] for k in metrics}, abs=1e-5), name
    assert abs(evals[-1]["eval_loss"] - evals[best_index]["eval_loss"]) > 1e-5
    # --push_to_hub (the same run: one test, so that pytest-xdist does not train it once per worker) uploads
    # best/, with its card, tokenizer, metrics and curves.
    assert RecordingApi.uploaded["repo"] == ("someone/medclip-protocols", False)
    files = set(RecordingApi.uploaded["files"])
    assert {"config.json", "model.safetensors", "README.md", "metrics.jsonl", "training_curves.png"} <= files
    assert {"tokenizer.json", "tokenizer_config.json"} & files  # the tokenizer travels with the model
    assert "Not for clinical use" in RecordingApi.uploaded["card"]
    assert summary["hub_commit"].endswith("/commit/abc")
    best_model = np.asarray(FlaxHybridCLIP.from_pretrained(out / "best").text_projection.kernel[...])
    final_model = np.asarray(FlaxHybridCLIP.from_pretrained(out).text_projection.kernel[...])
    np.testing.assert_array_equal(np.asarray(RecordingApi.uploaded["reloaded"].text_projection.kernel[...]),
                                  best_model)
    assert not np.array_equal(final_model, best_model)


@pytest.mark.heavy
@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (pip install wandb)")
def test_report_to_wandb_offline_writes_a_run_folder_with_the_metrics(run):
    _, out, _, rows = run
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir())
    (log,) = runs[0].glob("run-*.wandb")
    history = {row["_step"]: row for row in _wandb_history(log)}
    assert sorted(history) == sorted({r["step"] for r in rows})
    for row in rows:  # every number metrics.jsonl has at a step, W&B has there too (train and eval rows merged)
        logged = history[row["step"]]
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                assert logged[key] == pytest.approx(value, rel=1e-6), (row["step"], key)


def _wandb_history(path: Path) -> list[dict]:
    """The history rows of an offline run's .wandb file: wandb's protobuf Records in LevelDB's log format
    (a 7-byte file header; 32 KiB blocks of records, each a 7-byte header (crc32, length, type) and its data,
    split over blocks as FIRST/MIDDLE/LAST). wandb 0.31 ships no Python reader of its own."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, index, pending, rows = 32768, 7, b"", []
    while index + 7 <= len(data):
        if block - index % block < 7:  # a block's tail too short for a header is padding
            index += block - index % block
            continue
        _, length, kind = struct.unpack("<IHB", data[index:index + 7])
        pending += data[index + 7:index + 7 + length]
        index += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows
