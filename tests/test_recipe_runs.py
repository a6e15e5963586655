"""Each recipe trains a few steps through the real CLI on tiny towers of its architecture (ReduceLROnPlateau
surviving SIGKILL and resume is in tests/test_resume.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"


def _tiny_clip_model(folder: Path, vocab_size: int) -> Path:
    """A transformers CLIPModel (both towers, projections, temperature) small enough for a CPU test; its text
    tower pools at [SEP] (id 3) of the synthetic WordPiece tokenizer saved beside it."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    text = dict(vocab_size=vocab_size, max_position_embeddings=32, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    tiny = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    config = transformers.CLIPConfig(text_config={**text, **tiny},
                                     vision_config={**tiny, "image_size": 32, "patch_size": 8}, projection_dim=16)
    transformers.CLIPModel(config).save_pretrained(str(folder))
    return folder


@pytest.mark.heavy
def test_pubmedclip_recipe_trains_a_few_steps_from_a_clip_model(tmp_path):
    from medclip.data.synthetic import write_synthetic_tokenizer

    tokenizer = write_synthetic_tokenizer(tmp_path / "tokenizer")
    model = _tiny_clip_model(tmp_path / "clip", len(tokenizer))
    out = tmp_path / "run"
    cmd = [sys.executable, "run_hybrid_clip.py", "--recipe", "pubmedclip", "--output_dir", str(out),
           "--model_name_or_path", str(model), "--tokenizer_name", str(tmp_path / "tokenizer"),
           "--synthetic_train_samples", "64", "--synthetic_validation_samples", "32", "--synthetic_image_size", "32",
           "--max_seq_length", "24", "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "16",
           "--num_train_epochs", "2", "--logging_steps", "1", "--save_steps", "0", "--report_to", "none"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert len(evals) == 2 and all(np.isfinite(r["eval_loss"]) for r in evals)
    assert [r["learning_rate"] for r in rows if "learning_rate" in r][0] == 1e-5
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["steps"] == 8 and summary["best_metric"] == min(r["eval_loss"] for r in evals)
    assert "ReduceLROnPlateau" in (out / "README.md").read_text()  # the model card names the recipe's schedule


def _tiny_bert_folder(folder: Path, tokenizer) -> Path:
    """A tiny BERT text tower (ClinicalBERT's architecture) saved in transformers' layout by our own code."""
    from flax import nnx

    from medclip.models import BertConfig
    from medclip.models.bert import BertTower
    from medclip.checkpoints import conversion
    from medclip.checkpoints.assembly import model_tensors, tower_rules
    from safetensors.numpy import save_file

    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64)
    tower = BertTower(config, rngs=nnx.Rngs(0))
    folder.mkdir(parents=True)
    save_file(conversion.to_hf(model_tensors(tower), tower_rules(config, "hf")), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config.to_hf_dict()))
    tokenizer.save_pretrained(str(folder))
    return folder


def _recipe_smoke(tmp_path: Path, recipe: str, vision: Path, text: Path, *extra: str) -> list[dict]:
    out = tmp_path / "run"
    cmd = [sys.executable, "run_hybrid_clip.py", "--recipe", recipe, "--output_dir", str(out),
           "--vision_model_name_or_path", str(vision), "--text_model_name_or_path", str(text),
           "--tokenizer_name", str(text), "--synthetic_train_samples", "64", "--synthetic_validation_samples", "32",
           "--synthetic_image_size", "64", "--image_size", "64", "--max_seq_length", "24",
           "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "16", "--num_train_epochs", "1",
           "--logging_steps", "1", "--save_steps", "0", "--report_to", "none", "--warmup_steps", "1",
           "--min_mean_intensity", "0", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.heavy
def test_clip_tf_hybrid_recipe_trains_with_two_text_inputs_and_an_efficientnet(tmp_path):
    """The report's final model at tiny widths: EfficientNetV2 (timm's folder, written by timm), a BERT taking
    captions and a second text, hybrid loss, projection dropout, per-part learning rates."""
    from medclip.data.synthetic import write_synthetic_tokenizer

    text = _tiny_bert_folder(tmp_path / "bert", write_synthetic_tokenizer(tmp_path / "tokenizer"))
    rows = _recipe_smoke(tmp_path, "clip-tf-hybrid", GOLDEN / "timm_efficientnetv2_tiny", text,
                         "--second_text_field", "keywords")
    assert [r for r in rows if "eval_loss" in r] and all(np.isfinite(r["train_loss"]) for r in rows if "train_loss" in r)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["vision_config"]["model_type"] == "timm_efficientnet"
    assert config["medclip"]["text_inputs"] == 2 and config["medclip"]["text_head"]["dropout"] == 0.1


@pytest.mark.heavy
def test_clip_medical_caption_recipe_trains_a_resnet50(tmp_path):
    from medclip.data.synthetic import write_synthetic_tokenizer

    text = _tiny_bert_folder(tmp_path / "bert", write_synthetic_tokenizer(tmp_path / "tokenizer"))
    rows = _recipe_smoke(tmp_path, "clip-medical-caption", GOLDEN / "timm_resnet50", text)
    assert [r for r in rows if "eval_loss" in r]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["vision_config"]["model_type"] == "timm_resnet"


def _pmc_clip_csv(folder: Path, n: int, seed: int, name: str) -> Path:
    """Synthetic pairs as PMC-CLIP's CSV: tab-separated (its --csv-separator default) with its default keys
    `filepath` and `title`, under a .csv name (so our extension default, a comma, would not read it)."""
    from medclip.data.synthetic import write_synthetic_dataset

    lines = write_synthetic_dataset(folder, n, seed=seed, image_size=64, name=name).read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    path = folder / f"{name}.csv"
    path.write_text("filepath\ttitle\n" + "".join(f"{r['image_path']}\t{r['captions'][0]}\n" for r in rows))
    return path


@pytest.mark.heavy
def test_pmc_clip_recipe_trains_contrastive_and_mlm_with_a_modified_resnet(tmp_path):
    """Also: PMC-CLIP's own CSV flags read its CSV layout; the recipe's whole-word masking runs in the step."""
    from medclip.data.synthetic import write_synthetic_tokenizer

    text = _tiny_bert_folder(tmp_path / "bert", write_synthetic_tokenizer(tmp_path / "tokenizer"))
    out = tmp_path / "run"
    cmd = [sys.executable, "run_hybrid_clip.py", "--recipe", "pmc-clip", "--output_dir", str(out),
           "--vision_config", "modified_resnet.tiny:output_dim=32", "--projection_dim", "32",
           "--text_model_name_or_path", str(text), "--tokenizer_name", str(text),
           "--train_file", str(_pmc_clip_csv(tmp_path / "data", 64, 0, "train")),
           "--validation_file", str(_pmc_clip_csv(tmp_path / "data", 32, 1, "valid")),
           "--csv-separator", "\\t", "--csv-img-key", "filepath", "--csv-caption-key", "title",
           "--max_seq_length", "24", "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "16",
           "--num_train_epochs", "1", "--logging_steps", "1", "--save_steps", "0", "--report_to", "none",
           "--warmup_steps", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads((out / "data_report.json").read_text())
    assert report["train"]["kept"] == 64 and report["validation"]["kept"] == 32, report
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train_loss" in r]
    assert train and all(np.isfinite(r["train_mlm_loss"]) and 0 <= r["train_mlm_acc"] <= 1 for r in train)
    config = json.loads((out / "config.json").read_text())
    assert config["vision_config"]["model_type"] == "modified_resnet" and config["medclip"]["fusion"]
    assert config["medclip"]["vision_head"]["type"] == "none" and config["medclip"]["text_head"]["pooler"] == "cls"
    # PMC-CLIP's text form (padded, attended to), at the length trained with, saved for every tool
    assert config["medclip"]["text_preprocess"] == {"context_length": 24, "padding": "max_length", "mask_padding": False,
                                                    "clean": "none"}
