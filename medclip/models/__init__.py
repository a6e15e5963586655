"""Flax NNX towers and the two-tower FlaxHybridCLIP model."""

from medclip.models.bert import BertConfig, BertTower
from medclip.models.clip_text import CLIPTextConfig, CLIPTextTower
from medclip.models.clip_vision import CLIPVisionConfig, CLIPVisionTower
from medclip.models.hybrid import FlaxHybridCLIP, HybridCLIPConfig

__all__ = [
    "BertConfig",
    "BertTower",
    "CLIPTextConfig",
    "CLIPTextTower",
    "CLIPVisionConfig",
    "CLIPVisionTower",
    "FlaxHybridCLIP",
    "HybridCLIPConfig",
]
