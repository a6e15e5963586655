"""Flax NNX towers (registered by architecture name in `registry`) and the two-tower HybridCLIP model.

`medclip.FlaxHybridCLIP` is HybridCLIP with loading and saving; this package knows nothing of checkpoints.
Importing any module of this package runs this file first, which imports every built-in tower (each registers
itself, in this order), so the registry is complete wherever it is used.
"""

from medclip.models import (  # noqa: F401 (imported to register their towers)
    clip_vision, timm_vit, modified_resnet, timm_resnet, timm_efficientnet, siglip_vision, clip_text, bert,
    siglip_text)

from medclip.models.bert import BertConfig, BertTower
from medclip.models.clip_text import CLIPTextConfig, CLIPTextTower
from medclip.models.clip_vision import CLIPVisionConfig, CLIPVisionTower
from medclip.models.heads import HeadConfig
from medclip.models.hybrid import HybridCLIP, HybridCLIPConfig
from medclip.models.preprocess import Preprocess
from medclip.models.siglip_text import Siglip2TextConfig, SiglipTextConfig, SiglipTextTower
from medclip.models.siglip_vision import Siglip2VisionConfig, SiglipVisionConfig, SiglipVisionTower
from medclip.models.timm_efficientnet import TimmEfficientNetConfig
from medclip.models.timm_resnet import TimmResNetConfig
from medclip.models.timm_vit import TimmViTConfig

__all__ = [
    "BertConfig",
    "BertTower",
    "CLIPTextConfig",
    "CLIPTextTower",
    "CLIPVisionConfig",
    "CLIPVisionTower",
    "HeadConfig",
    "HybridCLIP",
    "HybridCLIPConfig",
    "Preprocess",
    "Siglip2TextConfig",
    "Siglip2VisionConfig",
    "SiglipTextConfig",
    "SiglipTextTower",
    "SiglipVisionConfig",
    "SiglipVisionTower",
    "TimmEfficientNetConfig",
    "TimmResNetConfig",
    "TimmViTConfig",
]
