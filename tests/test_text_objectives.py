"""Projection dropout, two text inputs (caption + keywords/concepts) and PMC-CLIP's MLM objective: the model,
the masking and loss against NumPy references, save/load, the train step, the embedder, the flags' checks and
a smoke run through the real CLI."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medclip import FlaxHybridCLIP, HybridCLIPConfig
from medclip.models.fusion import FusionConfig
from medclip.models.heads import HeadConfig
from medclip.training.mlm import MaskingConfig, mask_tokens, mlm_loss_and_accuracy
from medclip.training.optim import OptimizerConfig, make_optimizer
from medclip.training.step import StepConfig, init_state, make_train_step

ROOT = Path(__file__).resolve().parents[1]


def _inputs(batch=4, length=8, seed=0):
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(5, 90, size=(batch, length)), jnp.int32)
    mask = jnp.asarray(np.arange(length)[None] < rng.integers(3, length + 1, size=(batch, 1)), jnp.int32)
    pixels = jnp.asarray(rng.normal(size=(batch, 32, 32, 3)), jnp.float32)
    return ids, mask, pixels


# -- projection dropout ---------------------------------------------------------------------------------------
def test_projection_dropout_only_in_training():
    dropped = HeadConfig(dropout=0.5)
    model = FlaxHybridCLIP(HybridCLIPConfig.tiny().replace(vision_head=dropped, text_head=dropped), rngs=nnx.Rngs(0))
    ids, mask, pixels = _inputs()
    train = [model(ids, pixels, mask, head_dropout_rng=jax.random.PRNGKey(k)) for k in (1, 2)]
    for name in ("image_embeds", "text_embeds"):
        assert not np.allclose(getattr(train[0], name), getattr(train[1], name))
    evaluation = [model(ids, pixels, mask) for _ in range(2)]
    np.testing.assert_array_equal(evaluation[0].text_embeds, evaluation[1].text_embeds)
    np.testing.assert_array_equal(evaluation[0].image_embeds, evaluation[1].image_embeds)
    assert not np.allclose(train[0].text_embeds, evaluation[0].text_embeds)
    # rate 0: a training key changes nothing (the towers' dropout is off: no dropout_rng)
    plain = FlaxHybridCLIP(HybridCLIPConfig.tiny(), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(plain(ids, pixels, mask, head_dropout_rng=jax.random.PRNGKey(1)).text_embeds,
                                  plain(ids, pixels, mask).text_embeds)


def test_projection_dropout_flag_sets_both_heads_of_a_loaded_model(tmp_path):
    from medclip.data.synthetic import write_synthetic_tokenizer
    from medclip.training.arguments import DataArguments, ModelArguments
    from medclip.training.model_setup import build_model_and_tokenizer

    tokenizer = write_synthetic_tokenizer(tmp_path / "tok")
    config = HybridCLIPConfig.tiny()
    config = config.replace(text_config=dataclasses.replace(config.text_config, vocab_size=len(tokenizer)))
    FlaxHybridCLIP(config, rngs=nnx.Rngs(0)).save_pretrained(tmp_path / "m", tokenizer=tokenizer)
    model, _ = build_model_and_tokenizer(
        ModelArguments(model_name_or_path=str(tmp_path / "m"), projection_dropout=0.2),
        DataArguments(max_seq_length=16), jnp.float32, 0, tmp_path, mlm=True)
    assert model.config.vision_head.dropout == model.config.text_head.dropout == 0.2
    assert model.config.fusion is not None and model.fusion is not None  # --mlm added a fresh fusion module
    preset, _ = build_model_and_tokenizer(ModelArguments(model_preset="demo", projection_dropout=0.1),
                                          DataArguments(max_seq_length=16, second_text_field="keywords"),
                                          jnp.float32, 0, tmp_path)
    assert preset.config.text_head.dropout == preset.config.vision_head.dropout == 0.1
    assert preset.config.text_inputs == 2


# -- two text inputs ------------------------------------------------------------------------------------------
def _two_input_model(**changes):
    return FlaxHybridCLIP(HybridCLIPConfig.tiny().replace(text_inputs=2, **changes), rngs=nnx.Rngs(0))


def test_two_inputs_shapes_and_caption_fill():
    model = _two_input_model()
    hidden = model.config.text_config.hidden_size
    assert model.text_projection.kernel.shape == (2 * hidden, model.config.projection_dim)
    ids, mask, _ = _inputs()
    second_ids, second_mask, _ = _inputs(seed=1)
    features = model.get_text_features(ids, mask, second_input_ids=second_ids, second_attention_mask=second_mask)
    assert features.shape == (4, model.config.projection_dim)
    # the pooled outputs, concatenated, through the head
    _, first = model.text_model(ids, mask)
    _, second = model.text_model(second_ids, second_mask)
    expected = jnp.concatenate([first, second], -1) @ model.text_projection.kernel[...]
    np.testing.assert_allclose(features, expected, atol=1e-5)
    alone = model.get_text_features(ids, mask)  # captions alone: the caption is both inputs
    np.testing.assert_allclose(alone, model.get_text_features(ids, mask, second_input_ids=ids,
                                                              second_attention_mask=mask), atol=1e-6)
    one = FlaxHybridCLIP(HybridCLIPConfig.tiny(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="one text input"):
        one.get_text_features(ids, mask, second_input_ids=ids, second_attention_mask=mask)


def test_two_inputs_and_fusion_round_trip(tmp_path):
    model = _two_input_model(fusion=FusionConfig(num_layers=2, num_heads=4))
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["model_type"] == "vision-text-dual-encoder"
    assert saved["medclip"]["text_inputs"] == 2 and saved["medclip"]["fusion"]["num_layers"] == 2
    again = FlaxHybridCLIP.from_pretrained(tmp_path / "m")
    assert again.config == model.config
    ids, mask, pixels = _inputs()
    a, b = model(ids, pixels, mask, mlm=True), again(ids, pixels, mask, mlm=True)
    np.testing.assert_allclose(a.text_embeds, b.text_embeds, atol=1e-6)
    np.testing.assert_allclose(a.mlm_logits, b.mlm_logits, atol=1e-5)
    with pytest.raises(ValueError, match="OpenCLIP's layout"):
        model.save_open_clip(tmp_path / "oc")


def _step(model, config, batch, steps=2):
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    tx, _ = make_optimizer(params, OptimizerConfig(learning_rate=1e-3, total_steps=10, schedule="constant"))
    step = jax.jit(make_train_step(graphdef, tx, config))
    state = init_state(params, tx, 0)
    history = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        history.append(jax.device_get(metrics))
    return state, history


def test_train_step_with_two_inputs():
    ids, mask, pixels = _inputs()
    second_ids, second_mask, _ = _inputs(seed=1)
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels,
             "second_input_ids": second_ids, "second_attention_mask": second_mask}
    model = _two_input_model(text_head=HeadConfig(dropout=0.1))
    state, history = _step(model, StepConfig(), batch)
    assert all(bool(m["finite"]) for m in history) and history[0]["loss"] != history[1]["loss"]
    before = nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])
    assert not np.allclose(state.params["text_projection"]["kernel"], before["text_projection"]["kernel"])


def test_embedder_on_a_two_input_model_with_captions_only(tmp_path):
    from medclip.data.synthetic import write_synthetic_tokenizer
    from medclip.inference.embedder import Embedder

    tokenizer = write_synthetic_tokenizer(tmp_path / "tok")
    config = HybridCLIPConfig.tiny().replace(text_inputs=2)
    config = config.replace(text_config=dataclasses.replace(config.text_config, vocab_size=len(tokenizer)))
    model = FlaxHybridCLIP(config, rngs=nnx.Rngs(0))
    model.save_pretrained(tmp_path / "m", tokenizer=tokenizer)
    embedder = Embedder(tmp_path / "m", batch_size=4, max_seq_length=16)
    texts = ["chest x-ray showing a nodule", "ct of the abdomen"]
    embeds = embedder.embed_texts(texts)
    assert embeds.shape == (2, config.projection_dim)
    np.testing.assert_allclose(np.linalg.norm(embeds, axis=-1), 1.0, atol=1e-5)
    encoded = tokenizer(texts, padding="max_length", max_length=16, return_tensors="np")
    ids, mask = jnp.asarray(encoded["input_ids"], jnp.int32), jnp.asarray(encoded["attention_mask"], jnp.int32)
    expected = model.get_text_features(ids, mask, second_input_ids=ids, second_attention_mask=mask)
    expected = expected / jnp.linalg.norm(expected, axis=-1, keepdims=True)
    np.testing.assert_allclose(embeds, expected, atol=1e-5)
    with_keywords = embedder.embed_texts(texts, second_texts=["ct, abdomen", ""])
    assert not np.allclose(with_keywords, embeds)


# -- MLM ----------------------------------------------------------------------------------------------------
SPECIALS = (0, 1, 2, 3, 4)  # pad, unk, cls, sep, mask
MASKING = MaskingConfig(probability=0.15, mask_token_id=4, special_ids=SPECIALS, vocab_size=100)


def _numpy_masking(rng, ids, mask, config):
    """BERT's 80/10/10 rule, written out in NumPy."""
    eligible = (mask > 0) & ~np.isin(ids, config.special_ids)
    selected = eligible & (rng.random(ids.shape) < config.probability)
    action = rng.random(ids.shape)
    allowed = np.setdiff1d(np.arange(config.vocab_size), config.special_ids)
    out = ids.copy()
    out[selected & (action < 0.8)] = config.mask_token_id
    rand = selected & (action >= 0.8) & (action < 0.9)
    out[rand] = rng.choice(allowed, size=int(rand.sum()))
    return out, selected


def _masking_statistics(ids, mask, masked, selected):
    eligible = (mask > 0) & ~np.isin(ids, SPECIALS)
    changed = selected & (masked != ids)
    return {"selected": selected.sum() / eligible.sum(),
            "masked": (selected & (masked == MASKING.mask_token_id)).sum() / selected.sum(),
            "random": (changed & (masked != MASKING.mask_token_id)).sum() / selected.sum(),
            "kept": (selected & (masked == ids)).sum() / selected.sum(),
            "outside": int(((masked != ids) & ~selected).sum() + (selected & ~eligible).sum())}


def test_masking_statistics_match_bert_and_a_numpy_reference():
    rng = np.random.default_rng(0)
    batch, length = 512, 64
    ids = rng.integers(5, 100, size=(batch, length)).astype(np.int32)
    lengths = rng.integers(4, length + 1, size=batch)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    ids[:, 0], ids[np.arange(batch), lengths - 1] = 2, 3  # [CLS] ... [SEP]
    ids[mask == 0] = 0  # padding
    masked, selected = jax.jit(lambda r, i, m: mask_tokens(r, i, m, MASKING))(jax.random.PRNGKey(0), ids, mask)
    ours = _masking_statistics(ids, mask, np.asarray(masked), np.asarray(selected))
    ref = _masking_statistics(ids, mask, *_numpy_masking(rng, ids, mask, MASKING))
    n = ((mask > 0) & ~np.isin(ids, SPECIALS)).sum()  # ~16k eligible tokens, ~2.4k selected
    for stats in (ours, ref):
        assert stats["outside"] == 0  # only selected tokens change, and only eligible ones are selected
        assert abs(stats["selected"] - 0.15) < 4 * np.sqrt(0.15 * 0.85 / n)
        k = 0.15 * n
        assert abs(stats["masked"] - 0.8) < 4 * np.sqrt(0.8 * 0.2 / k)
        # a random replacement equal to the original (1 in 95) counts as kept
        assert abs(stats["random"] - 0.1 * 94 / 95) < 4 * np.sqrt(0.1 * 0.9 / k)
        assert abs(stats["kept"] - (0.1 + 0.1 / 95)) < 4 * np.sqrt(0.1 * 0.9 / k)
    for key in ("selected", "masked", "random", "kept"):
        assert abs(ours[key] - ref[key]) < 0.03, (key, ours, ref)
    assert not np.isin(np.asarray(masked)[np.asarray(selected) & (np.asarray(masked) != 4)], SPECIALS).any()


def test_mlm_loss_and_accuracy_match_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 7, 11)).astype(np.float32)
    labels = rng.integers(0, 11, size=(3, 7))
    selected = rng.random((3, 7)) < 0.4
    logits[0, 0, labels[0, 0]] += 10.0  # one certain hit
    selected[0, 0] = True
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected_loss = -log_probs[selected, labels[selected]].mean()  # PMC-CLIP's nll_loss over the labelled positions
    expected_acc = (logits.argmax(-1) == labels)[selected].mean()
    loss, acc = mlm_loss_and_accuracy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(selected))
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    np.testing.assert_allclose(acc, expected_acc, rtol=1e-6)
    zero = mlm_loss_and_accuracy(jnp.asarray(logits), jnp.asarray(labels), jnp.zeros((3, 7), bool))
    assert float(zero[0]) == 0.0 and float(zero[1]) == 0.0


def test_fusion_names_follow_pmc_clip_and_ignore_padding():
    from medclip.checkpoints.hf_layout import model_tensors_hf

    model = FlaxHybridCLIP(HybridCLIPConfig.tiny().replace(fusion=FusionConfig(num_layers=2, num_heads=4),
                                                           projection_dim=32), rngs=nnx.Rngs(0))
    keys = set(model_tensors_hf(model))
    width, vocab = model.config.text_config.hidden_size, model.config.text_config.vocab_size
    for i in range(2):
        for name in ("ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                     "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                     "mlp.c_proj.weight", "mlp.c_proj.bias"):
            assert f"fusion_module.resblocks.{i}.{name}" in keys
    tensors = model_tensors_hf(model)
    assert tensors["img_special_token"].shape == (1, 1, width) and tensors["mlm_projection"].shape == (width, vocab)
    assert tensors["fusion_module.resblocks.0.attn.in_proj_weight"].shape == (3 * width, width)
    assert "fusion_image_projection.weight" not in keys  # projection_dim == width: none, as in PMC-CLIP
    ids, mask, pixels = _inputs(length=8)
    short = model(ids, pixels, mask, mlm=True).mlm_logits
    padded = model(jnp.pad(ids, ((0, 0), (0, 4))), pixels, jnp.pad(mask, ((0, 0), (0, 4))), mlm=True).mlm_logits
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(short)[real], np.asarray(padded)[:, :8][real], atol=2e-4)


def test_train_step_with_mlm_logs_its_metrics():
    ids, mask, pixels = _inputs(batch=8, length=12)
    ids = ids.at[:, 0].set(2)
    model = FlaxHybridCLIP(HybridCLIPConfig.tiny().replace(fusion=FusionConfig(num_layers=1, num_heads=4)),
                           rngs=nnx.Rngs(0))
    config = StepConfig(masking=dataclasses.replace(MASKING, probability=0.5, vocab_size=99), mlm_weight=0.5)
    state, history = _step(model, config, {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels})
    for m in history:
        assert bool(m["finite"]) and m["mlm_loss"] > 0 and 0 <= m["mlm_acc"] <= 1
        np.testing.assert_allclose(m["loss"], m["contrastive_loss"] + 0.5 * m["mlm_loss"], rtol=1e-5)
    before = nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])
    assert not np.allclose(state.params["fusion"]["mlm_projection"], before["fusion"]["mlm_projection"])


# -- flags --------------------------------------------------------------------------------------------------
def _validate(tmp_path, model=None, data=None, **train):
    from medclip.training.arguments import DataArguments, ModelArguments, TrainingArguments
    from medclip.training.config_check import validate

    validate(model or ModelArguments(model_preset="demo"), data or DataArguments(),
             TrainingArguments(output_dir=str(tmp_path), do_train=True, **train))


def test_contradictory_flags_are_config_errors(tmp_path):
    from medclip.training.arguments import DataArguments, ModelArguments
    from medclip.training.config_check import ConfigError

    with pytest.raises(ConfigError, match="--mlm_weight"):
        _validate(tmp_path, mlm_weight=0.5)
    with pytest.raises(ConfigError, match="--mlm_probability"):
        _validate(tmp_path, mlm=True, mlm_probability=1.5)
    with pytest.raises(ConfigError, match="--projection_dropout"):
        _validate(tmp_path, model=ModelArguments(model_preset="demo", projection_dropout=1.0))
    one = tmp_path / "one"
    FlaxHybridCLIP(HybridCLIPConfig.tiny(), rngs=nnx.Rngs(0)).save_pretrained(one)
    with pytest.raises(ConfigError, match="--second_text_field keywords.*trained with one"):
        _validate(tmp_path, model=ModelArguments(model_name_or_path=str(one)),
                  data=DataArguments(second_text_field="keywords"))
    clip = tmp_path / "clip"
    FlaxHybridCLIP(HybridCLIPConfig.tiny("clip_text_model"), rngs=nnx.Rngs(0)).save_pretrained(clip)
    with pytest.raises(ConfigError, match="--mlm needs a text tower"):
        _validate(tmp_path, model=ModelArguments(model_name_or_path=str(clip)), mlm=True)
    _validate(tmp_path, mlm=True, mlm_weight=0.5, data=DataArguments(second_text_field="concepts"))  # fine


def test_unknown_second_text_field_is_a_data_error():
    from medclip.data.fields import second_texts
    from medclip.data.records import Record

    items = [Record(id="a", image="a.jpg", captions=["x"], keywords=["ct", "chest"], fields={"caption": "x"})]
    assert second_texts(items, "keywords") == ["ct, chest"]
    assert second_texts(items, "caption") == ["x"]
    with pytest.raises(ValueError, match="no record has a 'findings' field"):
        second_texts(items, "findings")


@pytest.mark.heavy
def test_cli_smoke_run_with_mlm_two_inputs_and_projection_dropout(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "run_hybrid_clip.py", "--output_dir", str(out), "--model_preset", "demo",
           "--synthetic_train_samples", "64", "--synthetic_validation_samples", "32", "--synthetic_image_size", "32",
           "--max_seq_length", "24", "--do_train", "--do_eval", "--max_steps", "4", "--per_device_train_batch_size",
           "16", "--per_device_eval_batch_size", "16", "--logging_steps", "2", "--save_steps", "0",
           "--report_to", "none", "--mlm", "--mlm_weight", "0.5", "--second_text_field", "keywords",
           "--projection_dropout", "0.1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train_loss" in r]
    assert len(train) == 2 and all(np.isfinite(r["train_mlm_loss"]) and 0 <= r["train_mlm_acc"] <= 1 for r in train)
    assert any("eval_t2i_R@5" in r for r in rows)
    saved = json.loads((out / "config.json").read_text())["medclip"]
    assert saved["text_inputs"] == 2 and saved["fusion"] and saved["text_head"]["dropout"] == 0.1
