"""What the reference systems' training loops do, through one real (in-process) run of the trainer: early
stopping stops at the right evaluation and `best/` holds the best evaluation's model (PubMedCLIP: patience 5 on
its validation metric); `--report_to wandb` offline writes a run folder with the metrics (the source's logger);
`--push_to_hub` uploads the best model with its card and tokenizer (no network: the Hub API is replaced by a
recorder, as tests/test_hub.py does for `model.push_to_hub`); the CLIP-TF report's hybrid loss with a learned
alpha trains and leaves the exported model loadable."""

from __future__ import annotations

import importlib.util
import json
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

PATIENCE = 1
METRIC = "eval_t2i_mrr"  # higher is better; a retrieval metric, so re-evaluating a saved model reproduces it
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
                        _train_args(out, do_train=True, do_eval=True, num_train_epochs=12, learning_rate=3e-2,
                                    early_stopping_patience=PATIENCE, metric_for_best_model=METRIC,
                                    loss="hybrid", hybrid_form="report", hybrid_alpha_learnable=True,
                                    report_to="wandb" if HAS_WANDB else "none",
                                    push_to_hub=True, hub_model_id="someone/medclip-protocols"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return tmp, out, summary, rows


def _evaluate(tmp: Path, model: Path, name: str) -> dict:
    """The saved model on the same validation set, as `--do_eval` without `--do_train` evaluates it."""
    args = (ModelArguments(model_name_or_path=str(model)), _data(tmp / name),
            _train_args(tmp / name / "out", do_eval=True, report_to="none"))
    validate(*args)
    return Trainer(*args).evaluate_only()["eval"]


@pytest.mark.heavy
def test_early_stopping_stops_at_the_right_evaluation_and_exports_the_best_model(run):
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
    assert stop is not None, [r[METRIC] for r in evals]  # this seed's run does stop (else nothing is tested)
    assert summary["stopped_early"] and len(evals) == stop + 1
    assert summary["steps"] == 2 * (stop + 1) < 24  # 2 steps an epoch, fewer than the 12 epochs asked
    assert summary["best_epoch"] == evals[best_index]["epoch"] and summary["best_metric"] == best
    # best/ is the best evaluation's model, the output folder the last one's: each reproduces its evaluation's
    # retrieval metrics (eval_loss aside: it reads the learned alpha, which is not exported), and the two
    # evaluations differ, so the check tells the models apart.
    retrieval = [k for k in evals[-1] if k.startswith(("eval_t2i", "eval_i2t"))]
    for folder, name, row in ((out / "best", "best", evals[best_index]), (out, "final", evals[-1])):
        again = _evaluate(tmp, folder, name)
        assert {k: again[k] for k in retrieval} == pytest.approx({k: row[k] for k in retrieval}, abs=1e-6), name
    assert {k: evals[-1][k] for k in retrieval} != pytest.approx({k: evals[best_index][k] for k in retrieval},
                                                                 abs=1e-6)


@pytest.mark.heavy
def test_push_to_hub_from_the_trainer_uploads_the_best_model_card_and_tokenizer(run):
    _, out, summary, _ = run
    assert RecordingApi.uploaded["repo"] == ("someone/medclip-protocols", False)
    files = set(RecordingApi.uploaded["files"])
    assert {"config.json", "model.safetensors", "README.md", "metrics.jsonl", "training_curves.png"} <= files
    assert {"tokenizer.json", "tokenizer_config.json"} & files  # the tokenizer travels with the model
    assert "Not for clinical use" in RecordingApi.uploaded["card"]
    assert summary["hub_commit"].endswith("/commit/abc")
    best = FlaxHybridCLIP.from_pretrained(out / "best")
    final = FlaxHybridCLIP.from_pretrained(out)
    pushed = RecordingApi.uploaded["reloaded"]
    np.testing.assert_array_equal(np.asarray(pushed.text_projection.kernel[...]),
                                  np.asarray(best.text_projection.kernel[...]))
    assert not np.array_equal(np.asarray(final.text_projection.kernel[...]),
                              np.asarray(best.text_projection.kernel[...]))


@pytest.mark.heavy
def test_learned_hybrid_alpha_trains_and_stays_out_of_the_model(run):
    _, out, _, rows = run
    alphas = [r["train_hybrid_alpha"] for r in rows if "train_hybrid_alpha" in r]
    assert alphas and abs(alphas[0] - 0.5) < 0.05 and len(set(alphas)) > 1
    assert all(0 < a < 1 for a in alphas)
    config = json.loads((out / "config.json").read_text())
    assert "hybrid_alpha" not in json.dumps(config)


@pytest.mark.heavy
@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (pip install wandb)")
def test_report_to_wandb_offline_writes_a_run_folder_with_the_metrics(run):
    _, out, _, rows = run
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir())
    logs = list(runs[0].glob("run-*.wandb"))
    assert logs and logs[0].stat().st_size > 0
    summary = json.loads((runs[0] / "files" / "wandb-summary.json").read_text())
    last_eval = [r for r in rows if "eval_loss" in r][-1]
    assert summary["eval_loss"] == pytest.approx(last_eval["eval_loss"])
    assert summary["_step"] == max(r["step"] for r in rows)
