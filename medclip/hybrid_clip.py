"""`FlaxHybridCLIP`: the two-tower model (medclip.models.HybridCLIP) with loading and saving, the class users
work with. Kept apart from the model so that the model package never imports the checkpoint code.

A folder may be a bucket URL (`gs://...`, medclip.storage): it is fetched to a temporary folder for loading, and
written to one then uploaded for saving, so the checkpoint readers and writers deal only in local files."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Self

from medclip import storage
from medclip.checkpoints import openclip, pretrained
from medclip.models.hybrid import HybridCLIP, HybridCLIPConfig


class FlaxHybridCLIP(HybridCLIP):
    """Parameters are fp32; `dtype` sets the compute dtype (bf16 on TPU/GPU); `remat` rematerialises each
    encoder layer to save activation memory."""

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> Self:
        """Our / transformers' VisionTextDualEncoder layout, a whole transformers CLIPModel, an OpenCLIP hub folder
        (`hf-hub:` ids too), or a bare OpenCLIP state dict with `open_clip_model=` (a config name or JSON)."""
        with storage.local_copy(name_or_path) as local:
            return pretrained.load_hybrid(cls, local, **kwargs)

    @classmethod
    def from_text_vision_pretrained(cls, text_name_or_path: str | os.PathLike,
                                    vision_name_or_path: str | os.PathLike, **kwargs: Any) -> Self:
        """Two pretrained towers, fresh heads. Keywords: HybridCLIPConfig's fields around the towers
        (projection_dim, vision_head, ...) and the rest of `pretrained.load_from_towers`'s (dtype, seed...)."""
        fields = {f.name for f in dataclasses.fields(HybridCLIPConfig)} - {"vision_config", "text_config"}
        model_fields = {k: kwargs.pop(k) for k in list(kwargs) if k in fields}
        with storage.local_copy(text_name_or_path) as text, storage.local_copy(vision_name_or_path) as vision:
            return pretrained.load_from_towers(cls, text, vision, model_fields=model_fields, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, tokenizer: Any = None) -> None:
        """transformers' CLIPModel layout when both towers and heads are CLIP's, else VisionTextDualEncoderModel's."""
        with storage.staged_folder(save_directory) as folder:
            pretrained.save_hybrid(self, folder, tokenizer=tokenizer)

    def save_open_clip(self, save_directory: str | os.PathLike) -> Path:
        """OpenCLIP's hub layout (open_clip_config.json + open_clip_model.safetensors)."""
        if not storage.is_url(save_directory):
            return openclip.save_open_clip(self, save_directory)
        with storage.staged_folder(save_directory) as folder:
            openclip.save_open_clip(self, folder)
        return storage.as_path(save_directory)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        from medclip.checkpoints.hub import push_model_to_hub

        return push_model_to_hub(self, repo_id, **kwargs)
