"""Our own layout, which is transformers' `VisionTextDualEncoderModel` (and the original flax-community
`hybrid-clip`) or, when both towers and heads are CLIP's, a whole transformers `CLIPModel`: `config.json` +
weights under `vision_model.` / `text_model.` / `visual_projection` / `text_projection` / `logit_scale`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from medclip.checkpoints import conversion
from medclip.checkpoints.assembly import (build_from_tensors, collapse_double_prefixes, head_rules, load_tensors,
                                          model_tensors, native_format, tower_rules)
from medclip.checkpoints.hf_config import CONFIG_JSON, read_config_json
from medclip.models.fusion import fusion_rules
from medclip.models.hybrid import HybridCLIPConfig
from medclip.models.weights import Rule


def hybrid_rules(config: HybridCLIPConfig) -> list[Rule]:
    """The VisionTextDualEncoderModel / CLIPModel layout; a SiglipModel's text projection is its text model's
    `head`, and its logit scale and bias are 1-element vectors."""
    if config.siglip_type is not None:
        return [*conversion.prefixed("vision_model.", tower_rules(config.vision_config, "hf"), "vision_model."),
                *conversion.prefixed("text_model.", tower_rules(config.text_config, "hf"), "text_model."),
                *head_rules("text_model.head", "text_projection", config.text_head),
                Rule("logit_scale", "logit_scale", "one"), Rule("logit_bias", "logit_bias", "one")]
    return [
        *conversion.prefixed("vision_model.", tower_rules(config.vision_config, native_format(config.vision_config)),
                             "vision_model."),
        *conversion.prefixed("text_model.", tower_rules(config.text_config, native_format(config.text_config)),
                             "text_model."),
        *head_rules("visual_projection", "visual_projection", config.vision_head),
        *head_rules("text_projection", "text_projection", config.text_head),
        Rule("logit_scale", "logit_scale"),
        Rule("logit_bias", "logit_bias"),
        *(fusion_rules(config.fusion) if config.fusion is not None else []),  # PMC-CLIP's names
    ]


def is_folder(folder: Path) -> bool:
    return (folder / CONFIG_JSON).is_file()


def load_folder(cls, folder: Path, spec: Any = None, *, dtype=jnp.float32, remat: bool = False) -> nnx.Module:
    """`spec` (an OpenCLIP model config) is not used: the folder's config.json says what the model is."""
    config = HybridCLIPConfig.from_dict(read_config_json(folder))
    tensors, source = load_tensors(folder)
    return build_from_tensors(cls, config, collapse_double_prefixes(tensors), hybrid_rules(config), source=source,
                              dtype=dtype, remat=remat)


def model_tensors_hf(model: nnx.Module) -> dict[str, np.ndarray]:
    """Our parameters renamed to transformers' VisionTextDualEncoderModel / CLIPModel keys."""
    return conversion.to_hf(model_tensors(model), hybrid_rules(model.config))


def save_hybrid(model: nnx.Module, save_directory: str | os.PathLike, *, tokenizer: Any = None) -> None:
    from safetensors.numpy import save_file

    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = model_tensors_hf(model)
    model.config.to_json_file(folder / CONFIG_JSON)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
