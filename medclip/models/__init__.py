"""Flax NNX towers (registered by architecture name in `registry`) and the two-tower HybridCLIP model.

`medclip.FlaxHybridCLIP` is HybridCLIP with loading and saving; this package knows nothing of checkpoints.
"""

from medclip.models.bert import BertConfig, BertTower
from medclip.models.clip_text import CLIPTextConfig, CLIPTextTower
from medclip.models.clip_vision import CLIPVisionConfig, CLIPVisionTower
from medclip.models.heads import HeadConfig
from medclip.models.hybrid import HybridCLIP, HybridCLIPConfig
from medclip.models.preprocess import Preprocess
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
    "TimmEfficientNetConfig",
    "TimmResNetConfig",
    "TimmViTConfig",
]
