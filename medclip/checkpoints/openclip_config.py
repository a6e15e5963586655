"""OpenCLIP model configs (`model_cfg`): open_clip's built-in names, reading one from a name, a file or a dict, and
the Hugging Face text tower an `hf_model_name` (PMC-CLIP: `bert_model_name`) points to.

Shared by the OpenCLIP and PMC-CLIP formats (PMC-CLIP is built on open_clip's code and configs); imports neither."""

from __future__ import annotations

import copy
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from medclip.checkpoints.hf_config import infer_model_type, read_json
from medclip.models.bert import BertConfig
from medclip.models.hybrid import HybridCLIPConfig, text_config_from_hf_dict

logger = logging.getLogger(__name__)


class OpenCLIPConfigError(ValueError):
    """An OpenCLIP model config we cannot build: unknown name, unsupported option, or weights that disagree."""


# open_clip's own model configs (src/open_clip/model_configs/*.json) for the models people fine-tune.
_VIT_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}
_BUILTIN: dict[str, dict[str, Any]] = {
    "ViT-B-32": {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
                 "text_cfg": _VIT_TEXT},
    "ViT-B-16": {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
                 "text_cfg": _VIT_TEXT},
    "ViT-L-14": {"embed_dim": 768, "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14},
                 "text_cfg": {**_VIT_TEXT, "width": 768, "heads": 12}},
    "ViT-L-14-336": {"embed_dim": 768,
                     "vision_cfg": {"image_size": 336, "layers": 24, "width": 1024, "patch_size": 14},
                     "text_cfg": {**_VIT_TEXT, "width": 768, "heads": 12}},
}
_BUILTIN.update({f"{name}-quickgelu": {**cfg, "quick_gelu": True} for name, cfg in list(_BUILTIN.items())})


def builtin_model_names() -> list[str]:
    return list(_BUILTIN)


def model_config(spec: str | os.PathLike | dict) -> dict[str, Any]:
    """A model config by open_clip name, from a JSON file (a model config or a whole open_clip_config.json),
    or as a dict."""
    if isinstance(spec, dict):
        data = spec
    elif str(spec) in _BUILTIN:
        return copy.deepcopy(_BUILTIN[str(spec)])
    elif Path(spec).is_file():
        data = read_json(Path(spec))
    else:
        raise OpenCLIPConfigError(f"unknown OpenCLIP model {str(spec)!r}: known names are {builtin_model_names()}; "
                                  "or give the model config as a JSON file")
    return copy.deepcopy(data.get("model_cfg", data))


def resolve_hf_text_config(name: str, tensors: dict[str, np.ndarray] | None, source: str,
                           prefix: str = "text.transformer.") -> Any:
    """open_clip fetches an HF text tower's config by `hf_model_name` at build time; the checkpoint has none.

    In order: a local folder of that name, the huggingface_hub cache, else the BERT config inferred from the
    weights' names and shapes. Each path says which it took."""
    folder = Path(name).expanduser()
    config_file = folder / "config.json" if folder.is_dir() else None
    how = f"the local folder {folder}"
    if config_file is None or not config_file.is_file():
        config_file, how = _cached_config(name), f"the huggingface_hub cache of {name}"
    if config_file is not None:
        data = read_json(Path(config_file))
        data["model_type"] = infer_model_type(data, name)
        logger.info("%s: text tower config of %s read from %s", source, name, how)
        return text_config_from_hf_dict(data)
    if tensors is None:
        raise OpenCLIPConfigError(f"{source}: the text tower's config ({name}) is neither a local folder nor in the "
                                  "huggingface_hub cache, and there are no weights to infer it from")
    config = infer_bert_config(tensors, prefix, source)
    logger.warning("%s: the config of text tower %s is neither a local folder nor cached; inferred it from the "
                   "weights as a BERT with %d layers, width %d, %d heads (assumed: 64 per head), vocabulary %d. "
                   "Download %s (or pass a folder) to use its own config.", source, name, config.num_hidden_layers,
                   config.hidden_size, config.num_attention_heads, config.vocab_size, name)
    return config


def _cached_config(name: str) -> str | None:
    if Path(name).is_absolute() or name.count("/") > 1:
        return None
    try:
        import huggingface_hub

        found = huggingface_hub.try_to_load_from_cache(name, "config.json")
    except Exception:  # an id the hub client rejects is simply not cached
        return None
    return found if isinstance(found, str) else None


def infer_bert_config(tensors: dict[str, np.ndarray], prefix: str, source: str) -> BertConfig:
    """A BERT's sizes from its weights. The head count is not in any shape: BERTs use 64 dimensions per head."""
    def shape(key: str) -> tuple[int, ...]:
        if prefix + key not in tensors:
            raise OpenCLIPConfigError(f"{source}: cannot infer the text tower's config: no {prefix + key} in the "
                                      "weights (is it a BERT?); make its config available (local folder or cache)")
        return tuple(np.shape(tensors[prefix + key]))

    vocab, width = shape("embeddings.word_embeddings.weight")
    layer_re = re.compile(re.escape(prefix) + r"encoder\.layer\.(\d+)\.")
    layers = {int(m.group(1)) for k in tensors if (m := layer_re.match(k))}
    types = tensors.get(prefix + "embeddings.token_type_embeddings.weight")
    return BertConfig(add_pooling_layer=prefix + "pooler.dense.weight" in tensors, vocab_size=vocab,
                      hidden_size=width, num_hidden_layers=len(layers),
                      num_attention_heads=max(width // 64, 1),
                      intermediate_size=shape("encoder.layer.0.intermediate.dense.weight")[0],
                      max_position_embeddings=shape("embeddings.position_embeddings.weight")[0],
                      type_vocab_size=0 if types is None else int(np.shape(types)[0]))


def text_tokenizer_name(config: HybridCLIPConfig) -> str | None:
    """Where an OpenCLIP model's tokenizer comes from: its HF text tower's `hf_tokenizer_name`, if any."""
    text_cfg = (config.open_clip_model_cfg or {}).get("text_cfg", {})
    return text_cfg.get("hf_tokenizer_name") or text_cfg.get("hf_model_name")
