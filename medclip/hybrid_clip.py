"""`FlaxHybridCLIP`: the two-tower model (medclip.models.HybridCLIP) with loading and saving, the class users
work with. Kept apart from the model so that the model package never imports the checkpoint code."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Self

from medclip.checkpoints import openclip, pretrained
from medclip.models.hybrid import HybridCLIP


class FlaxHybridCLIP(HybridCLIP):
    """Parameters are fp32; `dtype` sets the compute dtype (bf16 on TPU/GPU); `remat` rematerialises each
    encoder layer to save activation memory."""

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> Self:
        """Our / transformers' VisionTextDualEncoder layout, a whole transformers CLIPModel, an OpenCLIP hub folder
        (`hf-hub:` ids too), or a bare OpenCLIP state dict with `open_clip_model=` (a config name or JSON)."""
        return pretrained.load_hybrid(cls, name_or_path, **kwargs)

    @classmethod
    def from_text_vision_pretrained(cls, text_name_or_path: str | os.PathLike,
                                    vision_name_or_path: str | os.PathLike, **kwargs: Any) -> Self:
        return pretrained.load_from_towers(cls, text_name_or_path, vision_name_or_path, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, tokenizer: Any = None) -> None:
        """transformers' CLIPModel layout when both towers and heads are CLIP's, else VisionTextDualEncoderModel's."""
        pretrained.save_hybrid(self, save_directory, tokenizer=tokenizer)

    def save_open_clip(self, save_directory: str | os.PathLike) -> Path:
        """OpenCLIP's hub layout (open_clip_config.json + open_clip_model.safetensors)."""
        return openclip.save_open_clip(self, save_directory)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        from medclip.checkpoints.hub import push_model_to_hub

        return push_model_to_hub(self, repo_id, **kwargs)
