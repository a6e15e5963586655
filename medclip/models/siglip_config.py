"""A HybridCLIP config as transformers' `SiglipConfig` / `Siglip2Config` (model_type "siglip" / "siglip2") and
back, so a SigLIP model is read from and saved as the very class it came from.

SiglipModel is two SigLIP towers, no visual projection (the attention-pooling head's output is the image
embedding), the text model's biased `head` Linear as the text projection, a learned logit scale and bias, and
logits exactly `text @ image.T * exp(scale) + bias` (no clamp). Its inputs: the tower's square image squashed with
PIL bicubic to mean = std = 0.5, and captions padded to `max_position_embeddings` with no attention mask.
"""

from __future__ import annotations

import math
from typing import Any

from medclip.models.heads import HeadConfig
from medclip.models.preprocess import (
    SIGLIP_PREPROCESS,
    Preprocess,
    TextPreprocess,
    siglip_text,
)
from medclip.models.siglip_text import Siglip2TextConfig, SiglipTextConfig
from medclip.models.siglip_vision import Siglip2VisionConfig, SiglipVisionConfig
from medclip.models.tower_contract import UnsupportedOptionError

# model_type -> (transformers class, vision config, text config)
SIGLIP_TYPES: dict[str, tuple[str, type, type]] = {
    "siglip": ("SiglipModel", SiglipVisionConfig, SiglipTextConfig),
    "siglip2": ("Siglip2Model", Siglip2VisionConfig, Siglip2TextConfig),
}
VISION_HEAD = HeadConfig(type="none")
TEXT_HEAD = HeadConfig(type="linear", bias=True)  # SiglipTextModel.head
LOGIT_SCALE_INIT = math.log(10.0)  # the SigLIP paper's initialisation, for configs that carry no weights
LOGIT_BIAS_INIT = -10.0


def siglip_model_type(config: Any) -> str | None:
    """"siglip" / "siglip2" when a HybridCLIPConfig holds exactly what that transformers class holds, else None."""
    for model_type, (_, vision, text) in SIGLIP_TYPES.items():
        if (type(config.vision_config) is vision and type(config.text_config) is text
                and config.vision_head == VISION_HEAD and config.text_head == TEXT_HEAD
                and config.logit_bias_init_value is not None and not config.clamp_logit_scale
                and config.text_inputs == 1 and config.fusion is None):
            return model_type
    return None


def to_siglip_dict(config: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """The SiglipConfig dict; `extra` (our preprocessing) goes under `medclip`, which transformers keeps unread."""
    model_type = siglip_model_type(config)
    architecture = SIGLIP_TYPES[model_type][0]
    text = {**config.text_config.to_hf_dict(), "projection_size": config.projection_dim}
    return {"model_type": model_type, "architectures": [architecture],
            "vision_config": config.vision_config.to_hf_dict(), "text_config": text,
            "logit_scale_init_value": config.logit_scale_init_value,
            "logit_bias_init_value": config.logit_bias_init_value, "medclip": extra}


def siglip_fields(data: dict[str, Any]) -> dict[str, Any]:
    """HybridCLIPConfig's fields from a SiglipConfig / Siglip2Config dict (transformers' or ours)."""
    model_type = data["model_type"]
    _, vision_class, text_class = SIGLIP_TYPES[model_type]
    vision = vision_class.from_hf_dict(dict(data.get("vision_config") or {}))
    text_data = dict(data.get("text_config") or {})
    text = text_class.from_hf_dict(text_data)
    projection = text_data.get("projection_size") or text.hidden_size
    if projection != vision.hidden_size:
        raise UnsupportedOptionError(f"{model_type}: the text head projects to {projection} but the image embedding "
                                     f"(the vision tower's width) is {vision.hidden_size}; they must be equal")
    extra = data.get("medclip") or {}
    return {
        "vision_config": vision, "text_config": text, "projection_dim": projection,
        "logit_scale_init_value": data.get("logit_scale_init_value", LOGIT_SCALE_INIT),
        "logit_bias_init_value": data.get("logit_bias_init_value", LOGIT_BIAS_INIT),
        "vision_head": VISION_HEAD, "text_head": TEXT_HEAD, "clamp_logit_scale": False,
        "preprocess": Preprocess.from_dict(extra["preprocess"]) if "preprocess" in extra else SIGLIP_PREPROCESS,
        "text_preprocess": (TextPreprocess.from_dict(extra["text_preprocess"]) if "text_preprocess" in extra
                            else siglip_text(text.max_position_embeddings)),
    }
