"""The two-tower model: any registered vision tower and text tower (medclip.models.registry), a projection head
each and a learned temperature (and optional bias), in Hugging Face naming so users can move between this and
transformers. Loading and saving are not here (medclip.FlaxHybridCLIP adds them): the model knows nothing of
checkpoints.
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

from medclip.models import registry
from medclip.models.bert import BertConfig
from medclip.models.clip_text import CLIPTextConfig
from medclip.models.clip_vision import CLIPVisionConfig
from medclip.models.fusion import FusionConfig, MLMFusion
from medclip.models.heads import HeadConfig, build_head, project
from medclip.models.layers import split_rng
from medclip.models.packing import PackingPlan
from medclip.models.preprocess import Preprocess, TextPreprocess
from medclip.models.siglip_config import SIGLIP_TYPES, siglip_fields, siglip_model_type, to_siglip_dict

LOGIT_SCALE_MAX = 100.0  # exp(logit_scale) is clamped here, as in CLIP, so the temperature cannot run away
DUAL_ENCODER_TYPES = ("vision-text-dual-encoder", "hybrid-clip", "clip", *SIGLIP_TYPES)


def logit_temperature(logit_scale: jax.Array, clamp: bool = True) -> jax.Array:
    """exp(logit_scale), capped at LOGIT_SCALE_MAX where the model clamps it (CLIP; not SigLIP)."""
    scale = jnp.exp(logit_scale)
    return jnp.minimum(scale, LOGIT_SCALE_MAX) if clamp else scale


def text_config_from_hf_dict(data: dict[str, Any]) -> Any:
    """Picks the text tower from `model_type` (a whole SiglipConfig: its text tower reads the nesting); unknown
    types fail here rather than load wrong weights."""
    if data.get("model_type") == "clip":  # a whole CLIP config given as a text tower's
        data = {"model_type": "clip_text_model", **data.get("text_config", {})}
    return registry.config_from_hf_dict(data, "text")


def vision_config_from_hf_dict(data: dict[str, Any]) -> Any:
    if data.get("model_type") in SIGLIP_TYPES:
        return registry.config_from_hf_dict(data, "vision")
    if data.get("model_type") == "clip" or "vision_config" in data:
        data = {"model_type": "clip_vision_model", **data["vision_config"]}
    return registry.config_from_hf_dict(data, "vision")


@dataclasses.dataclass(frozen=True)
class HybridCLIPConfig:
    """Written as transformers' `vision-text-dual-encoder` config (or, for two CLIP towers with CLIP's heads, as a
    `clip` config), so PyTorch users can load our models. What transformers has no field for (heads other than
    CLIP's, preprocessing, an OpenCLIP origin) goes under the `medclip` key, which transformers ignores."""

    vision_config: Any
    text_config: Any
    projection_dim: int = 512
    logit_scale_init_value: float = math.log(1 / 0.07)
    logit_bias_init_value: float | None = None  # set (e.g. -10.0) to learn a bias for the sigmoid loss
    vision_head: HeadConfig = HeadConfig()
    text_head: HeadConfig = HeadConfig()
    preprocess: Preprocess | None = None  # None: the vision tower's default (set at construction)
    # context length, padding and whether padding is masked (PMC-CLIP's text encoder attends to it)
    text_preprocess: TextPreprocess = TextPreprocess()
    # 2: a second text (ROCO keywords, concepts...) through the same text tower, its pooled output concatenated
    # with the caption's before the text head (whose input is then 2 x hidden_size), as the "CLIP TensorFlow &
    # ROCO" report's final model. Without a second text the caption fills both inputs (get_text_features).
    text_inputs: int = 1
    fusion: FusionConfig | None = None  # PMC-CLIP's fusion module + MLM head (medclip.models.fusion)
    # exp(logit_scale) capped at LOGIT_SCALE_MAX, as CLIP trains; SigLIP's logits are exp(scale) unclamped, and its
    # released scales exceed 100
    clamp_logit_scale: bool = True
    # An OpenCLIP model's own `model_cfg` (open_clip_config.json), kept so it can be exported back exactly.
    open_clip_model_cfg: dict[str, Any] | None = dataclasses.field(default=None, compare=False, hash=False)

    def __post_init__(self):
        vision = registry.tower_for_config(self.vision_config)  # fails on an unregistered tower config
        registry.tower_for_config(self.text_config)
        if self.preprocess is None:
            object.__setattr__(self, "preprocess", vision.preprocess or Preprocess())
        if self.text_inputs not in (1, 2):
            raise ValueError(f"text_inputs must be 1 or 2, not {self.text_inputs}")
        positions = registry.max_text_positions(self.text_config)
        if self.text_preprocess.length(positions) > positions:
            raise ValueError(f"text_preprocess.context_length {self.text_preprocess.context_length} exceeds the "
                             f"text tower's {positions} positions")

    @property
    def context_length(self) -> int:
        """Tokens a caption is truncated (and, for max_length padding, padded) to, in training and every tool."""
        return self.text_preprocess.length(registry.max_text_positions(self.text_config))

    def text_attention_mask(self, attention_mask: jax.Array | None) -> jax.Array | None:
        """The mask the text tower and fusion module attend with: none when the padding is attended to."""
        return attention_mask if self.text_preprocess.mask_padding else None

    @property
    def image_preprocess(self) -> Preprocess:
        return self.preprocess

    @property
    def is_clip(self) -> bool:
        """Two CLIP towers with CLIP's heads: exactly what transformers' CLIPModel holds."""
        clip_head = HeadConfig()
        return (type(self.vision_config) is CLIPVisionConfig and type(self.text_config) is CLIPTextConfig
                and self.vision_head == clip_head and self.text_head == clip_head
                and self.logit_bias_init_value is None and self.text_config.pool_type == "eos"
                and self.text_inputs == 1 and self.fusion is None)

    @property
    def siglip_type(self) -> str | None:
        """"siglip" / "siglip2" when this is exactly a transformers SiglipModel / Siglip2Model, saved as one."""
        return siglip_model_type(self)

    @classmethod
    def tiny(cls, text_model_type: str = "bert") -> Self:
        text = CLIPTextConfig.tiny() if text_model_type == "clip_text_model" else BertConfig.tiny(text_model_type)
        return cls(vision_config=CLIPVisionConfig.tiny(), text_config=text, projection_dim=16)

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        if self.siglip_type is not None:
            extra = {"preprocess": self.image_preprocess.to_dict(), "text_preprocess": self.text_preprocess.to_dict()}
            return to_siglip_dict(self, extra)
        if self.is_clip:
            data = {"model_type": "clip", "architectures": ["CLIPModel"]}
        else:
            data = {"model_type": "vision-text-dual-encoder", "architectures": ["VisionTextDualEncoderModel"]}
        data.update({
            "vision_config": self.vision_config.to_hf_dict(),
            "text_config": self.text_config.to_hf_dict(),
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
        })
        if self.logit_bias_init_value is not None:
            data["logit_bias_init_value"] = self.logit_bias_init_value
        extra = {"vision_head": self.vision_head.to_dict(), "text_head": self.text_head.to_dict(),
                 "preprocess": self.image_preprocess.to_dict(), "text_preprocess": self.text_preprocess.to_dict(),
                 "open_clip_model_cfg": self.open_clip_model_cfg,
                 "text_inputs": self.text_inputs if self.text_inputs != 1 else None,
                 "fusion": self.fusion.to_dict() if self.fusion is not None else None}
        data["medclip"] = {k: v for k, v in extra.items() if v}
        if not self.clamp_logit_scale:
            data["medclip"]["clamp_logit_scale"] = False
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Reads our configs, transformers' dual-encoder and CLIP ones and the original flax-community
        `hybrid-clip`."""
        model_type = data.get("model_type")
        if model_type not in DUAL_ENCODER_TYPES:
            raise ValueError(f"not a dual-encoder config: model_type {model_type!r} (expected one of "
                             f"{DUAL_ENCODER_TYPES})")
        if model_type in SIGLIP_TYPES:
            return cls(**siglip_fields(data))
        for key in ("vision_config", "text_config"):
            if key not in data:
                raise ValueError(f"dual-encoder config lacks {key!r}")
        vision, text = dict(data["vision_config"]), dict(data["text_config"])
        if model_type == "clip":  # CLIPConfig's nested dicts may lack their model_type
            vision.setdefault("model_type", "clip_vision_model")
            text.setdefault("model_type", "clip_text_model")
        extra = data.get("medclip") or {}
        preprocess = Preprocess.from_dict(extra["preprocess"]) if "preprocess" in extra else None
        if preprocess is None and model_type == "clip":  # transformers' CLIPModel, preprocessed by CLIPImageProcessor
            preprocess = Preprocess(resample="pil_bicubic", crop_rounding="floor")
        return cls(
            vision_config=vision_config_from_hf_dict(vision),
            text_config=text_config_from_hf_dict(text),
            projection_dim=data.get("projection_dim", 512),
            logit_scale_init_value=data.get("logit_scale_init_value", math.log(1 / 0.07)),
            logit_bias_init_value=data.get("logit_bias_init_value"),
            vision_head=HeadConfig.from_dict(extra.get("vision_head")),
            text_head=HeadConfig.from_dict(extra.get("text_head")),
            preprocess=preprocess, text_preprocess=TextPreprocess.from_dict(extra.get("text_preprocess")),
            open_clip_model_cfg=extra.get("open_clip_model_cfg"),
            text_inputs=extra.get("text_inputs", 1),
            fusion=FusionConfig.from_dict(extra.get("fusion")),
            clamp_logit_scale=extra.get("clamp_logit_scale", True),
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


@struct.dataclass
class HybridCLIPOutput:
    logits_per_image: jax.Array  # (images, texts)
    logits_per_text: jax.Array  # (texts, images)
    image_embeds: jax.Array  # (images, projection_dim), L2-normalised
    text_embeds: jax.Array  # (texts, projection_dim), L2-normalised
    mlm_logits: jax.Array | None = None  # (texts, length, vocab_size) fp32, from `__call__(..., mlm=True)`


def _head_rng(rng: jax.Array | None) -> jax.Array | None:
    """The heads' dropout key: apart from the towers' (which split `rng` themselves), and unused at rate 0."""
    return None if rng is None else jax.random.fold_in(rng, 0x4EAD)


def l2_normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def contrastive_logits(image_embeds: jax.Array, text_embeds: jax.Array, scale: jax.Array,
                       bias: jax.Array | None = None) -> jax.Array:
    """logits_per_text (texts, images) of normalised embeddings at temperature `scale` (already clamped), plus an
    optional bias: `HybridCLIP.logits` and the evaluation loss (rebuilt from saved embeddings) share it."""
    logits_per_text = text_embeds @ image_embeds.T * scale
    return logits_per_text if bias is None else logits_per_text + bias


def tower_keys(dropout_rng: jax.Array | None,
               head_dropout_rng: jax.Array | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The image side's and the text side's dropout keys (towers', heads'), as keyword arguments of the encode and
    project calls: one split for both calls of a step, so a cached tower sees the key the tower would have."""
    vision_rng, text_rng = split_rng(dropout_rng, 2)
    vision_head_rng, text_head_rng = split_rng(head_dropout_rng, 2)
    return ({"dropout_rng": vision_rng, "head_dropout_rng": vision_head_rng},
            {"dropout_rng": text_rng, "head_dropout_rng": text_head_rng})


class HybridCLIP(nnx.Module):
    """Two-tower contrastive model (medclip.FlaxHybridCLIP adds loading and saving). Parameters are fp32; `dtype`
    sets the compute dtype (bf16 on TPU/GPU); `remat` rematerialises each encoder layer to save activation memory.

    Its interface is two encoders and a logits function, as big_vision's two-tower model: `encode_image`,
    `encode_text` (each a tower's pooled output, `pool_*`, through its head, `project_*`) and `logits`. A caller
    that holds a locked tower's pooled output (a cache) calls `project_*` on it instead; `fusion_logits` is
    PMC-CLIP's MLM head over the caption's hidden states. `__call__` composes them for convenience."""

    def __init__(self, config: HybridCLIPConfig, *, dtype=jnp.float32, remat: bool = False,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.dtype = dtype
        self.vision_model = registry.build_tower(config.vision_config, dtype=dtype, remat=remat, rngs=rngs)
        self.text_model = registry.build_tower(config.text_config, dtype=dtype, remat=remat, rngs=rngs)
        self.visual_projection = build_head(config.vision_config.hidden_size, config.vision_head,
                                            config.projection_dim, dtype=dtype, rngs=rngs)
        self.text_projection = build_head(config.text_config.hidden_size * config.text_inputs, config.text_head,
                                          config.projection_dim, dtype=dtype, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init_value, jnp.float32))
        self.logit_bias = (nnx.Param(jnp.asarray(config.logit_bias_init_value, jnp.float32))
                           if config.logit_bias_init_value is not None else None)
        self.fusion = (MLMFusion(config.fusion, config.text_config.hidden_size, config.projection_dim,
                                 config.text_config.vocab_size, dtype=dtype, rngs=rngs)
                       if config.fusion is not None else None)

    # -- image ---------------------------------------------------------------------------------------------
    def pool_image(self, pixel_values: jax.Array, *, train: bool = False,
                   dropout_rng: jax.Array | None = None) -> jax.Array:
        """The image tower's pooled output (batch, hidden) of NHWC pixels: what a locked tower's cache holds."""
        return self.vision_model(pixel_values, dropout_rng=dropout_rng, pooled_only=True, train=train)[1]

    def project_image(self, pooled: jax.Array, *, dropout_rng: jax.Array | None = None,
                      head_dropout_rng: jax.Array | None = None) -> jax.Array:
        """The image head on a pooled output (computed now or cached). Its dropout key is `head_dropout_rng`,
        else derived from `dropout_rng` (None: no dropout)."""
        return project(self.visual_projection, self.config.vision_head, pooled,
                       _head_rng(dropout_rng if head_dropout_rng is None else head_dropout_rng))

    def encode_image(self, pixel_values: jax.Array, *, train: bool = False, dropout_rng: jax.Array | None = None,
                     head_dropout_rng: jax.Array | None = None) -> jax.Array:
        """Projected, unnormalised image embeddings (batch, projection_dim); pixel_values are NHWC."""
        pooled = self.pool_image(pixel_values, train=train, dropout_rng=dropout_rng)
        return self.project_image(pooled, dropout_rng=dropout_rng, head_dropout_rng=head_dropout_rng)

    # -- text ----------------------------------------------------------------------------------------------
    def pool_text(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                  second_input_ids: jax.Array | None = None, second_attention_mask: jax.Array | None = None,
                  dropout_rng: jax.Array | None = None, text_packing: PackingPlan | None = None,
                  with_hidden: bool = False) -> tuple[jax.Array | None, jax.Array]:
        """(the caption's last hidden states (batch, length, hidden) when `with_hidden`, else None; the pooled
        output the text head reads). A two-input model (config.text_inputs == 2) encodes `second_input_ids` with
        the same tower (padded, no packing) and concatenates both pooled outputs; without a second input the
        caption fills it. `text_packing` (`medclip.models.packing.plan_packing` on this batch's mask) skips the
        padding's work."""
        first_rng, second_rng = split_rng(dropout_rng, 2) if self.config.text_inputs == 2 else (dropout_rng, None)
        if text_packing is not None and not self.config.text_preprocess.mask_padding:
            raise ValueError("text packing drops the padding, which this model attends to (mask_padding=False)")
        attention_mask = self.config.text_attention_mask(attention_mask)
        second_attention_mask = self.config.text_attention_mask(second_attention_mask)
        hidden, pooled = self.text_model(input_ids, attention_mask, dropout_rng=first_rng,
                                         pooled_only=not with_hidden, packing=text_packing,
                                         pooler=self.config.text_head.pooler)
        if self.config.text_inputs == 2:
            if second_input_ids is None:  # captions alone (zero-shot, retrieval): the caption is both inputs
                second_input_ids, second_attention_mask = input_ids, attention_mask
            _, second = self.text_model(second_input_ids, second_attention_mask, dropout_rng=second_rng,
                                        pooled_only=True, pooler=self.config.text_head.pooler)
            pooled = jnp.concatenate([pooled, second], axis=-1)
        elif second_input_ids is not None:
            raise ValueError("this model takes one text input (config.text_inputs == 1); got second_input_ids")
        return (hidden if with_hidden else None), pooled

    def project_text(self, pooled: jax.Array, *, dropout_rng: jax.Array | None = None,
                     head_dropout_rng: jax.Array | None = None) -> jax.Array:
        """The text head on a pooled output (computed now or cached); dropout keys as `project_image`."""
        return project(self.text_projection, self.config.text_head, pooled,
                       _head_rng(dropout_rng if head_dropout_rng is None else head_dropout_rng))

    def encode_text(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                    second_input_ids: jax.Array | None = None, second_attention_mask: jax.Array | None = None,
                    dropout_rng: jax.Array | None = None, head_dropout_rng: jax.Array | None = None,
                    text_packing: PackingPlan | None = None) -> jax.Array:
        """Projected, unnormalised text embeddings (batch, projection_dim); the inputs as `pool_text`."""
        _, pooled = self.pool_text(input_ids, attention_mask, second_input_ids=second_input_ids,
                                   second_attention_mask=second_attention_mask, dropout_rng=dropout_rng,
                                   text_packing=text_packing)
        return self.project_text(pooled, dropout_rng=dropout_rng, head_dropout_rng=head_dropout_rng)

    # transformers' names for the two encoders (the tools and users' code call these)
    def get_image_features(self, pixel_values: jax.Array, **kwargs: Any) -> jax.Array:
        return self.encode_image(pixel_values, **kwargs)

    def get_text_features(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                          **kwargs: Any) -> jax.Array:
        return self.encode_text(input_ids, attention_mask, **kwargs)

    # -- the contrastive and MLM heads ---------------------------------------------------------------------
    def temperature_scale(self) -> jax.Array:
        return logit_temperature(self.logit_scale[...], self.config.clamp_logit_scale)

    def logits(self, image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
        """logits_per_text (texts, images) of L2-normalised embeddings: the learned temperature and bias."""
        return contrastive_logits(image_embeds, text_embeds, self.temperature_scale(),
                                  None if self.logit_bias is None else self.logit_bias[...])

    def fusion_logits(self, text_hidden: jax.Array, image_embeds: jax.Array,
                      attention_mask: jax.Array | None) -> jax.Array:
        """PMC-CLIP's MLM logits (texts, length, vocab_size) from the (masked) caption's hidden states
        (`pool_text(..., with_hidden=True)`) and the normalised image embeddings."""
        if self.fusion is None:
            raise ValueError("MLM needs a model with a fusion module (config.fusion)")
        return self.fusion(text_hidden, image_embeds, self.config.text_attention_mask(attention_mask))

    def output(self, image_features: jax.Array, text_features: jax.Array, *, text_hidden: jax.Array | None = None,
               attention_mask: jax.Array | None = None) -> HybridCLIPOutput:
        """Normalised embeddings, logits and (given the caption's hidden states) MLM logits from the two encoders'
        features, however they were computed."""
        image_embeds, text_embeds = l2_normalize(image_features), l2_normalize(text_features)
        logits_per_text = self.logits(image_embeds, text_embeds)
        mlm_logits = None if text_hidden is None else self.fusion_logits(text_hidden, image_embeds, attention_mask)
        return HybridCLIPOutput(logits_per_image=logits_per_text.T, logits_per_text=logits_per_text,
                                image_embeds=image_embeds, text_embeds=text_embeds, mlm_logits=mlm_logits)

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array, attention_mask: jax.Array | None = None, *,
                 dropout_rng: jax.Array | None = None, head_dropout_rng: jax.Array | None = None,
                 train: bool = False, second_input_ids: jax.Array | None = None,
                 second_attention_mask: jax.Array | None = None, mlm: bool = False) -> HybridCLIPOutput:
        """Both encoders and the logits in one call. `dropout_rng` drives the towers' dropout,
        `head_dropout_rng` the heads' (default: derived from `dropout_rng`); None means none. `mlm` also runs
        the fusion module (PMC-CLIP's objective; pass masked input_ids)."""
        if mlm and self.fusion is None:
            raise ValueError("mlm=True needs a model with a fusion module (config.fusion)")
        image_keys, text_keys = tower_keys(dropout_rng, head_dropout_rng)
        image_features = self.encode_image(pixel_values, train=train, **image_keys)
        text_hidden, pooled = self.pool_text(input_ids, attention_mask, second_input_ids=second_input_ids,
                                             second_attention_mask=second_attention_mask,
                                             dropout_rng=text_keys["dropout_rng"], with_hidden=mlm)
        return self.output(image_features, self.project_text(pooled, **text_keys), text_hidden=text_hidden,
                           attention_mask=attention_mask)
