"""CLIP vision transformer (ViT) tower; pooled output is the post-layernorm CLS token."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Self

import jax
import jax.numpy as jnp
from flax import nnx

from medclip.models.config_base import TowerConfig
from medclip.models.layers import Encoder, PreNormLayer, dense


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(TowerConfig):
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0

    model_type: ClassVar[str] = "clip_vision_model"

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> Self:
        # A full CLIP config (model_type "clip") nests the vision tower's fields.
        if data.get("model_type") == "clip" or "vision_config" in data:
            data = data["vision_config"]
        return super().from_hf_dict(data)

    @classmethod
    def tiny(cls) -> Self:
        return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   image_size=32, patch_size=8)

    @classmethod
    def base_patch32(cls) -> Self:
        """openai/clip-vit-base-patch32."""
        return cls()

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class CLIPVisionEmbeddings(nnx.Module):
    def __init__(self, config: CLIPVisionConfig, *, dtype, rngs: nnx.Rngs):
        p, c, d = config.patch_size, config.num_channels, config.hidden_size
        init = jax.nn.initializers.normal(0.02)
        # (patch_h, patch_w, channels, hidden): the conv kernel in HWIO, applied as one matmul over patches.
        self.patch_embedding = nnx.Param(init(rngs.params(), (p, p, c, d)))
        self.class_embedding = nnx.Param(init(rngs.params(), (d,)))
        self.position_embedding = nnx.Embed(config.num_patches + 1, d, rngs=rngs)
        self.config = config
        self.dtype = dtype

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg = self.config
        batch, height, width, channels = pixel_values.shape
        if channels != cfg.num_channels or height != cfg.image_size or width != cfg.image_size:
            raise ValueError(
                f"pixel_values must be NHWC (batch, {cfg.image_size}, {cfg.image_size}, {cfg.num_channels}) "
                f"for this vision config, got {pixel_values.shape}; NCHW input needs a transpose to NHWC")
        p = cfg.patch_size
        grid = cfg.image_size // p
        x = pixel_values[:, : grid * p, : grid * p].astype(self.dtype)
        patches = x.reshape(batch, grid, p, grid, p, channels).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(batch, grid * grid, p * p * channels)
        kernel = self.patch_embedding[...].reshape(p * p * channels, -1).astype(self.dtype)
        embeds = dense(patches, kernel)  # (batch, patches, hidden)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (batch, 1, embeds.shape[-1]))
        embeds = jnp.concatenate([cls, embeds], axis=1)
        return embeds + self.position_embedding.embedding[...].astype(self.dtype)[None]


class CLIPVisionTower(nnx.Module):
    """Returns (last_hidden_state, pooled_output) like transformers' CLIPVisionModel."""

    def __init__(self, config: CLIPVisionConfig, *, dtype=jnp.float32, remat: bool = False, rngs: nnx.Rngs):
        self.config = config
        d, eps = config.hidden_size, config.layer_norm_eps
        self.embeddings = CLIPVisionEmbeddings(config, dtype=dtype, rngs=rngs)
        self.pre_layernorm = nnx.LayerNorm(d, epsilon=eps, dtype=dtype, rngs=rngs)
        self.encoder = Encoder([
            PreNormLayer(d, config.num_attention_heads, config.intermediate_size, config.hidden_act, eps,
                         config.attention_dropout, dtype=dtype, rngs=rngs)
            for _ in range(config.num_hidden_layers)
        ], remat=remat)
        self.post_layernorm = nnx.LayerNorm(d, epsilon=eps, dtype=dtype, rngs=rngs)

    def __call__(self, pixel_values: jax.Array, *, dropout_rng: jax.Array | None = None,
                 pooled_only: bool = False):
        """`pooled_only` skips the last layer's work for every token but CLS (last_hidden_state is then None)."""
        hidden = self.pre_layernorm(self.embeddings(pixel_values))
        cls_rows = jnp.zeros(hidden.shape[0], jnp.int32) if pooled_only else None
        hidden = self.encoder(hidden, None, dropout_rng, cls_rows)
        pooled = self.post_layernorm(hidden[:, 0])
        return (None if pooled_only else hidden), pooled
