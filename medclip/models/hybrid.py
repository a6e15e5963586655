"""FlaxHybridCLIP: a CLIP vision tower paired with any supported text tower, two projections and a
learned temperature, in Hugging Face naming so users can move between this and transformers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Self

import jax
import jax.numpy as jnp
from flax import nnx, struct

from medclip.models.bert import BERT_MODEL_TYPES, BertConfig, BertTower
from medclip.models.clip_text import CLIPTextConfig, CLIPTextTower
from medclip.models.clip_vision import CLIPVisionConfig, CLIPVisionTower
from medclip.models.packing import PackingPlan

TextConfig = CLIPTextConfig | BertConfig
LOGIT_SCALE_MAX = 100.0  # exp(logit_scale) is clamped here, as in CLIP, so the temperature cannot run away
TEXT_MODEL_TYPES = ("clip_text_model", "clip", *BERT_MODEL_TYPES)


def text_config_from_hf_dict(data: dict[str, Any]) -> TextConfig:
    """Picks the text tower from `model_type`; unknown types fail here rather than load wrong weights."""
    model_type = data.get("model_type")
    if model_type in ("clip_text_model", "clip"):
        return CLIPTextConfig.from_hf_dict(data)
    if model_type in BERT_MODEL_TYPES:
        return BertConfig.from_hf_dict(data)
    raise ValueError(f"unknown text model_type {model_type!r}; supported: {TEXT_MODEL_TYPES}")


def vision_config_from_hf_dict(data: dict[str, Any]) -> CLIPVisionConfig:
    model_type = data.get("model_type")
    if model_type not in ("clip_vision_model", "clip"):
        raise ValueError(f"unknown vision model_type {model_type!r}; supported: ('clip_vision_model', 'clip')")
    return CLIPVisionConfig.from_hf_dict(data)


@dataclasses.dataclass(frozen=True)
class HybridCLIPConfig:
    """Written as transformers' `vision-text-dual-encoder` config, so PyTorch users can load our models."""

    vision_config: CLIPVisionConfig
    text_config: TextConfig
    projection_dim: int = 512
    logit_scale_init_value: float = math.log(1 / 0.07)
    logit_bias_init_value: float | None = None  # set (e.g. -10.0) to learn a bias for the sigmoid loss

    @classmethod
    def tiny(cls, text_model_type: str = "bert") -> Self:
        text = CLIPTextConfig.tiny() if text_model_type == "clip_text_model" else BertConfig.tiny(text_model_type)
        return cls(vision_config=CLIPVisionConfig.tiny(), text_config=text, projection_dim=16)

    def to_dict(self) -> dict[str, Any]:
        data = {
            "model_type": "vision-text-dual-encoder",
            "architectures": ["VisionTextDualEncoderModel"],
            "vision_config": self.vision_config.to_hf_dict(),
            "text_config": self.text_config.to_hf_dict(),
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
        }
        if self.logit_bias_init_value is not None:
            data["logit_bias_init_value"] = self.logit_bias_init_value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Reads our configs, transformers' dual-encoder ones and the original flax-community `hybrid-clip`."""
        model_type = data.get("model_type")
        if model_type not in ("vision-text-dual-encoder", "hybrid-clip"):
            raise ValueError(f"not a dual-encoder config: model_type {model_type!r} "
                             "(expected 'vision-text-dual-encoder' or 'hybrid-clip')")
        for key in ("vision_config", "text_config"):
            if key not in data:
                raise ValueError(f"dual-encoder config lacks {key!r}")
        return cls(
            vision_config=vision_config_from_hf_dict(data["vision_config"]),
            text_config=text_config_from_hf_dict(data["text_config"]),
            projection_dim=data.get("projection_dim", 512),
            logit_scale_init_value=data.get("logit_scale_init_value", math.log(1 / 0.07)),
            logit_bias_init_value=data.get("logit_bias_init_value"),
        )

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> Self:
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data)


def build_text_tower(config: TextConfig, *, dtype, remat: bool, rngs: nnx.Rngs) -> nnx.Module:
    if isinstance(config, CLIPTextConfig):
        return CLIPTextTower(config, dtype=dtype, remat=remat, rngs=rngs)
    return BertTower(config, dtype=dtype, remat=remat, rngs=rngs)


@struct.dataclass
class HybridCLIPOutput:
    logits_per_image: jax.Array  # (images, texts)
    logits_per_text: jax.Array  # (texts, images)
    image_embeds: jax.Array  # (images, projection_dim), L2-normalised
    text_embeds: jax.Array  # (texts, projection_dim), L2-normalised


def l2_normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class FlaxHybridCLIP(nnx.Module):
    """Two-tower contrastive model. Parameters are fp32; `dtype` sets the compute dtype (bf16 on TPU/GPU);
    `remat` rematerialises each encoder layer to save activation memory."""

    def __init__(self, config: HybridCLIPConfig, *, dtype=jnp.float32, remat: bool = False,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.dtype = dtype
        self.vision_model = CLIPVisionTower(config.vision_config, dtype=dtype, remat=remat, rngs=rngs)
        self.text_model = build_text_tower(config.text_config, dtype=dtype, remat=remat, rngs=rngs)
        init = jax.nn.initializers.normal(0.02)
        self.visual_projection = nnx.Linear(config.vision_config.hidden_size, config.projection_dim,
                                            use_bias=False, dtype=dtype, kernel_init=init, rngs=rngs)
        self.text_projection = nnx.Linear(config.text_config.hidden_size, config.projection_dim,
                                          use_bias=False, dtype=dtype, kernel_init=init, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init_value, jnp.float32))
        self.logit_bias = (nnx.Param(jnp.asarray(config.logit_bias_init_value, jnp.float32))
                           if config.logit_bias_init_value is not None else None)

    def get_image_features(self, pixel_values: jax.Array, *, dropout_rng: jax.Array | None = None) -> jax.Array:
        """Projected, unnormalised image embeddings (batch, projection_dim); pixel_values are NHWC."""
        _, pooled = self.vision_model(pixel_values, dropout_rng=dropout_rng, pooled_only=True)
        return self.visual_projection(pooled)

    def get_text_features(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                          token_type_ids: jax.Array | None = None, position_ids: jax.Array | None = None, *,
                          dropout_rng: jax.Array | None = None, text_packing: PackingPlan | None = None) -> jax.Array:
        """Projected, unnormalised text embeddings (batch, projection_dim). `text_packing` (from
        `medclip.models.packing.plan_packing` on this batch's mask) skips the padding's work."""
        _, pooled = self.text_model(input_ids, attention_mask, token_type_ids=token_type_ids,
                                    position_ids=position_ids, dropout_rng=dropout_rng, pooled_only=True,
                                    packing=text_packing)
        return self.text_projection(pooled)

    def temperature_scale(self) -> jax.Array:
        return jnp.minimum(jnp.exp(self.logit_scale[...]), LOGIT_SCALE_MAX)

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None, position_ids: jax.Array | None = None, *,
                 dropout_rng: jax.Array | None = None, text_packing: PackingPlan | None = None) -> HybridCLIPOutput:
        vision_rng, text_rng = (None, None) if dropout_rng is None else tuple(jax.random.split(dropout_rng))
        image_embeds = l2_normalize(self.get_image_features(pixel_values, dropout_rng=vision_rng))
        text_embeds = l2_normalize(self.get_text_features(input_ids, attention_mask, token_type_ids,
                                                          position_ids, dropout_rng=text_rng,
                                                          text_packing=text_packing))
        logits_per_text = text_embeds @ image_embeds.T * self.temperature_scale()
        if self.logit_bias is not None:
            logits_per_text = logits_per_text + self.logit_bias[...]
        return HybridCLIPOutput(logits_per_image=logits_per_text.T, logits_per_text=logits_per_text,
                                image_embeds=image_embeds, text_embeds=text_embeds)

    # Loading and saving live in medclip.checkpoints; these delegate so users need only this class.
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> Self:
        from medclip.checkpoints.pretrained import load_hybrid

        return load_hybrid(cls, name_or_path, **kwargs)

    @classmethod
    def from_text_vision_pretrained(cls, text_name_or_path: str | os.PathLike,
                                    vision_name_or_path: str | os.PathLike, **kwargs: Any) -> Self:
        from medclip.checkpoints.pretrained import load_from_towers

        return load_from_towers(cls, text_name_or_path, vision_name_or_path, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, tokenizer: Any = None) -> None:
        from medclip.checkpoints.pretrained import save_hybrid

        save_hybrid(self, save_directory, tokenizer=tokenizer)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        from medclip.checkpoints.hub import push_model_to_hub

        return push_model_to_hub(self, repo_id, **kwargs)
