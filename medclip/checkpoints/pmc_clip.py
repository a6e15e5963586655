"""PMC-CLIP's checkpoints (Lin et al., MICCAI 2023; github.com/WeixiongLin/PMC-CLIP).

`checkpoint.pt` is a training checkpoint `{"epoch", "name", "state_dict", "optimizer"}` saved from DDP (`module.`
keys) of `PMC_CLIP` with `RN50_fusion4`: a ModifiedResNet image encoder (`visual.*`, output 768), PubMedBERT
(`text_encoder.*`, a transformers BertModel) whose text feature is the [CLS] hidden state `@ text_projection` (a raw
(768, 768) parameter), `logit_scale`, and for the MLM objective `fusion_module.*`, `img_special_token` and
`mlm_projection`. The optimizer state is skipped (read without executing anything); the fusion module and MLM head
load into the model's `fusion` when they are there, for the recipe that trains PMC-CLIP's MLM objective.
`positional_embedding` and `ln_final` are parameters PMC-CLIP builds but its text path never reads: skipped, said.

The separately published parts (`image_encoder(resnet50).pth`, `text_encoder.pth`, `text_projection_layer.pth`)
load from their folder the same way.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from medclip.checkpoints import conversion
from medclip.checkpoints.assembly import build_from_tensors, tower_rules
from medclip.checkpoints.openclip_config import OpenCLIPConfigError, model_config, resolve_hf_text_config
from medclip.checkpoints.readers import read_checkpoint
from medclip.models.bert import BertConfig
from medclip.models.fusion import FusionConfig, fusion_rules
from medclip.models.heads import HeadConfig
from medclip.models.hybrid import HybridCLIPConfig
from medclip.models.modified_resnet import config_from_open_clip as resnet_config
from medclip.models.preprocess import PMC_CLIP_TEXT, Preprocess, pil_resample
from medclip.models.weights import Rule

logger = logging.getLogger(__name__)

# src/pmc_clip/model_configs/RN50_fusion4.json
RN50_FUSION4 = {"embed_dim": 768, "clip_model": "PMC_CLIP",
                "vision_cfg": {"image_size": 224, "layers": [3, 4, 6, 3], "width": 64, "patch_size": None},
                "text_cfg": {"context_length": 77, "vocab_size": 30522, "width": 768, "heads": 8, "layers": 12,
                             "fusion_layers": 4,
                             "bert_model_name": "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract-fulltext"}}
CONFIGS = {"RN50_fusion4": RN50_FUSION4}
PART_FILES = {"visual.": "image_encoder(resnet50).pth", "text_encoder.": "text_encoder.pth",
              "text_projection": "text_projection_layer.pth"}
_UNREAD = re.compile(r"^(positional_embedding|ln_final\.(weight|bias))$")  # built by PMC_CLIP, never used


def recognise_state_dict(spec: str | os.PathLike | dict | None, tensors: dict[str, np.ndarray]) -> bool:
    """PMC-CLIP's checkpoint.pt: named by its config (RN50_fusion4, or a model_cfg with clip_model PMC_CLIP), or
    recognised by its keys (a BERT `text_encoder.` beside a ModifiedResNet's `visual.attnpool.`)."""
    if (isinstance(spec, str) and spec in CONFIGS) or (isinstance(spec, dict) and spec.get("clip_model") == "PMC_CLIP"):
        return True
    return any(k.startswith("text_encoder.") for k in tensors) and any(k.startswith("visual.attnpool.")
                                                                       for k in tensors)


def pmc_model_config(spec: str | os.PathLike | dict | None) -> dict[str, Any]:
    if spec is None:
        return copy.deepcopy(RN50_FUSION4)
    if isinstance(spec, str) and spec in CONFIGS:
        return copy.deepcopy(CONFIGS[spec])
    return model_config(spec)


def config_from_pmc_clip(model_cfg: dict[str, Any], tensors: dict[str, np.ndarray], source: str) -> HybridCLIPConfig:
    vision_cfg, text_cfg, embed_dim = model_cfg["vision_cfg"], model_cfg["text_cfg"], model_cfg["embed_dim"]
    if not isinstance(vision_cfg.get("layers"), (list, tuple)) or vision_cfg.get("timm_model_name"):
        raise OpenCLIPConfigError(f"{source}: only PMC-CLIP's ModifiedResNet image encoders are supported")
    if not text_cfg.get("bert_model_name"):
        raise OpenCLIPConfigError(f"{source}: only PMC-CLIP's BERT text encoders are supported")
    text = resolve_hf_text_config(text_cfg["bert_model_name"], tensors, source, prefix="text_encoder.")
    if isinstance(text, BertConfig) and "text_encoder.pooler.dense.weight" not in tensors:
        text = text.replace(add_pooling_layer=False)
    mlm = "mlm_projection" in tensors and any(k.startswith("fusion_module.") for k in tensors)
    fusion = FusionConfig(num_layers=text_cfg.get("fusion_layers", 1), num_heads=text_cfg.get("heads", 8)) if mlm else None
    vision = resnet_config(vision_cfg, embed_dim)
    return HybridCLIPConfig(
        vision_config=vision, text_config=text, projection_dim=embed_dim,
        # its transforms (open_clip's): PIL bicubic resize of the shorter side, torchvision's rounded centre crop
        preprocess=vision.default_preprocess.replace(resample="pil_bicubic", crop_rounding="round"),
        vision_head=HeadConfig(type="none"),
        # the [CLS] hidden state (PMC-CLIP finds it by PubMedBERT's [CLS] id, at position 0) @ text_projection
        text_head=HeadConfig(type="linear", bias=False, pooler="cls"), fusion=fusion,
        # encode_text pads to context_length and runs BERT (and the fusion module) without an attention mask
        text_preprocess=PMC_CLIP_TEXT.replace(context_length=text_cfg.get("context_length", 77)))


def rules(config: HybridCLIPConfig) -> list[Rule]:
    out = [*conversion.prefixed("visual.", tower_rules(config.vision_config, "openclip"), "vision_model."),
           *conversion.prefixed("text_encoder.", tower_rules(config.text_config, "hf"), "text_model."),
           Rule("text_projection", "text_projection.kernel"), Rule("logit_scale", "logit_scale")]
    return out + (fusion_rules(config.fusion) if config.fusion is not None else [])


def load_tensors(cls, tensors: dict[str, np.ndarray], spec: str | os.PathLike | dict | None, source: str, *,
                 dtype=jnp.float32, remat: bool = False, preprocess_cfg: dict | None = None) -> nnx.Module:
    """A PMC-CLIP state dict (already unwrapped from its training checkpoint and `module.` prefix);
    `preprocess_cfg`, an OpenCLIP folder's, sets the image normalisation."""
    model_cfg = pmc_model_config(spec)
    config = config_from_pmc_clip(model_cfg, tensors, source)
    if preprocess_cfg:
        resample = pil_resample(preprocess_cfg.get("interpolation", "bicubic"))
        config = config.replace(preprocess=Preprocess.from_dict(preprocess_cfg).replace(resample=resample,
                                                                                       crop_rounding="round"))
    skipped = sorted(k for k in tensors if _UNREAD.match(k))
    ignored = _UNREAD
    if config.fusion is None:
        extra = sorted(k for k in tensors if k.startswith(("fusion_module.", "img_special_token", "mlm_projection")))
        if extra:
            logger.info("%s: no mlm_projection, so the fusion module is not loaded (%d keys skipped)", source, len(extra))
            skipped += extra
            ignored = re.compile(_UNREAD.pattern + r"|^(fusion_module\.|img_special_token$)")
    if skipped:
        logger.info("%s: PMC-CLIP keys not used by retrieval: %s", source, skipped[:8])
    if "logit_scale" not in tensors:  # the separately published parts carry no temperature
        tensors = {**tensors, "logit_scale": np.asarray(np.log(1 / 0.07), np.float32)}
    return build_from_tensors(cls, config, tensors, rules(config), source=source, dtype=dtype, remat=remat,
                              ignored=ignored)


def has_parts(folder: Path) -> bool:
    """PMC-CLIP's separately published parts, all three in one folder."""
    return all((folder / name).is_file() for name in PART_FILES.values())


def load_parts(cls, folder: Path, spec: str | os.PathLike | dict | None = None, *, dtype=jnp.float32,
               remat: bool = False) -> nnx.Module:
    """`image_encoder(resnet50).pth` (the image encoder's state dict), `text_encoder.pth` (the BertModel's) and
    `text_projection_layer.pth` (one tensor), as PMC-CLIP publishes them besides checkpoint.pt."""
    tensors: dict[str, np.ndarray] = {}
    for prefix, name in PART_FILES.items():
        part = read_checkpoint(folder / name)
        if prefix == "text_projection":
            if len(part) != 1:
                raise OpenCLIPConfigError(f"{folder / name}: expected one tensor, found {sorted(part)[:5]}")
            tensors["text_projection"] = next(iter(part.values()))
        else:
            tensors.update({prefix + k.removeprefix("module.").removeprefix(prefix): v for k, v in part.items()})
    return load_tensors(cls, tensors, spec, str(folder), dtype=dtype, remat=remat)
