"""SigLIP's vision tower (transformers' SiglipVisionModel, and Siglip2VisionModel at a fixed resolution).

A ViT without a class token or a layer norm before the encoder: learned position embeddings over the patch grid,
pre-norm layers, a final layer norm, then multi-head attention pooling ("MAP"): one learned probe attends over
every token through a torch `nn.MultiheadAttention`, followed by a layer norm and an MLP on a residual branch.
Its output is the image embedding itself (SiglipModel has no visual projection).

SigLIP 2 embeds patches with a Linear over flattened (row, column, channel) patches instead of a convolution and
resizes its position grid to each image's patch grid; at a fixed resolution whose patch grid is the position grid
that resize is the identity, and that is the case built here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Self

import jax
import jax.numpy as jnp
from flax import nnx

from medclip.models.clip_vision import _hf_layer, patchify
from medclip.models.config_base import VisionTowerConfig
from medclip.models.kernels import attention, dense
from medclip.models.layers import MLP, SelfAttention, linear, pre_norm_encoder
from medclip.models.preprocess import SIGLIP_PREPROCESS, Preprocess
from medclip.models.registry import register
from medclip.models.tower_contract import TowerSpec, UnsupportedOptionError
from medclip.models.weights import Rule, embedding, fused_linear, norm
from medclip.models.weights import linear as linear_rule


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig(VisionTowerConfig):
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0

    model_type: ClassVar[str] = "siglip_vision_model"
    patch_linear: ClassVar[bool] = False  # SigLIP 2: patches embedded by a Linear over flattened patches
    default_preprocess: ClassVar[Preprocess] = SIGLIP_PREPROCESS

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise UnsupportedOptionError(f"SigLIP image_size {self.image_size} is not a multiple of patch_size "
                                         f"{self.patch_size}")

    @property
    def stochastic(self) -> bool:
        return self.attention_dropout > 0

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> Self:
        if "vision_config" in data:  # a whole SiglipConfig
            data = data["vision_config"]
        if not data.get("vision_use_head", True):
            raise UnsupportedOptionError("a SigLIP vision tower without its attention-pooling head "
                                         "(vision_use_head false) has no pooled output; not supported")
        for key in ("image_size", "patch_size"):
            if isinstance(data.get(key), (list, tuple)):
                sizes = set(data[key])
                if len(sizes) != 1:
                    raise UnsupportedOptionError(f"SigLIP {key} {data[key]} is not square; not supported")
                data = {**data, key: sizes.pop()}
        return super().from_hf_dict(data)

    def to_hf_dict(self) -> dict[str, Any]:
        return {**super().to_hf_dict(), "vision_use_head": True}

    @classmethod
    def tiny(cls) -> Self:
        return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   image_size=32, patch_size=8)

    @classmethod
    def medsiglip_448(cls) -> Self:
        """google/medsiglip-448's vision tower (a SoViT-400m/14 at 448 px: 1,024 patches)."""
        return cls(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                   image_size=448, patch_size=14)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class Siglip2VisionConfig(SiglipVisionConfig):
    """Siglip2VisionConfig names `num_patches` (the position grid) instead of an image size: built at the
    resolution whose patch grid is that grid, the only one a fixed-size input has."""

    model_type: ClassVar[str] = "siglip2_vision_model"
    patch_linear: ClassVar[bool] = True

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> Self:
        if "vision_config" in data:
            data = data["vision_config"]
        data = dict(data)
        num_patches = int(data.pop("num_patches", 256))
        grid = math.isqrt(num_patches)
        if grid * grid != num_patches:
            raise UnsupportedOptionError(f"Siglip2 num_patches {num_patches} is not a square grid; only the "
                                         "fixed-resolution case (a square position grid) is supported")
        patch = data.get("patch_size", 16)
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        data.setdefault("image_size", grid * patch)
        if data["image_size"] != grid * patch:
            raise UnsupportedOptionError(f"Siglip2 image_size {data['image_size']} does not give its {grid}x{grid} "
                                         f"position grid at patch_size {patch}; only that fixed resolution is "
                                         "supported (no position resizing)")
        return super().from_hf_dict(data)

    def to_hf_dict(self) -> dict[str, Any]:
        data = super().to_hf_dict()
        data.pop("image_size")
        return {**data, "num_patches": self.num_patches}


class SiglipEmbeddings(nnx.Module):
    def __init__(self, config: SiglipVisionConfig, *, dtype, rngs: nnx.Rngs):
        p, c, d = config.patch_size, config.num_channels, config.hidden_size
        init = jax.nn.initializers.normal(0.02)
        if config.patch_linear:
            self.patch_embedding = nnx.Linear(p * p * c, d, dtype=dtype, rngs=rngs)
        else:  # the conv kernel in HWIO (patch_h, patch_w, channels, hidden), applied as one matmul over patches
            self.patch_embedding = nnx.Param(init(rngs.params(), (p, p, c, d)))
            self.patch_bias = nnx.Param(jnp.zeros((d,)))
        self.position_embedding = nnx.Embed(config.num_patches, d, rngs=rngs)
        self.config = config
        self.dtype = dtype

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        patches = patchify(pixel_values, self.config, self.dtype)
        if self.config.patch_linear:
            embeds = linear(self.patch_embedding, patches)
        else:
            kernel = self.patch_embedding[...].reshape(patches.shape[-1], -1).astype(self.dtype)
            embeds = dense(patches, kernel, self.patch_bias[...].astype(self.dtype))
        return embeds + self.position_embedding.embedding[...].astype(self.dtype)[None]


class ProbeAttention(SelfAttention):
    """torch's nn.MultiheadAttention with one query sequence (the probe) attending over the tokens."""

    def __call__(self, query: jax.Array, x: jax.Array) -> jax.Array:  # type: ignore[override]
        (q,) = self._heads(self._project(query, "q"))
        k, v = self._heads(self._project(x, "kv"))
        context = attention(q, k, v, None)
        return linear(self.out_proj, context.reshape(q.shape[0], q.shape[1], -1))


class AttentionPoolingHead(nnx.Module):
    """transformers' SiglipMultiheadAttentionPoolingHead: attn(probe, x, x), then h + mlp(ln(h))."""

    def __init__(self, config: SiglipVisionConfig, *, dtype, rngs: nnx.Rngs):
        d = config.hidden_size
        self.probe = nnx.Param(jax.nn.initializers.normal(0.02)(rngs.params(), (1, 1, d)))
        self.attention = ProbeAttention(d, config.num_attention_heads, 0.0, dtype=dtype, rngs=rngs)
        self.layernorm = nnx.LayerNorm(d, epsilon=config.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = MLP(d, config.intermediate_size, config.hidden_act, dtype=dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, hidden: jax.Array) -> jax.Array:
        probe = jnp.broadcast_to(self.probe[...].astype(self.dtype), (hidden.shape[0], 1, hidden.shape[-1]))
        pooled = self.attention(probe, hidden)
        return (pooled + self.mlp(self.layernorm(pooled)))[:, 0]


class SiglipVisionTower(nnx.Module):
    """Returns (last_hidden_state, pooled_output) like transformers' SiglipVisionModel."""

    def __init__(self, config: SiglipVisionConfig, *, dtype=jnp.float32, remat: bool = False, rngs: nnx.Rngs):
        self.config = config
        d, eps = config.hidden_size, config.layer_norm_eps
        self.embeddings = SiglipEmbeddings(config, dtype=dtype, rngs=rngs)
        self.encoder = pre_norm_encoder(config, dtype=dtype, remat=remat, rngs=rngs)
        self.post_layernorm = nnx.LayerNorm(d, epsilon=eps, dtype=dtype, rngs=rngs)
        self.head = AttentionPoolingHead(config, dtype=dtype, rngs=rngs)

    def __call__(self, pixel_values: jax.Array, *, dropout_rng: jax.Array | None = None,
                 pooled_only: bool = False, train: bool = False):
        """The probe attends over every token, so `pooled_only` saves nothing but the returned states."""
        del train
        hidden = self.post_layernorm(self.encoder(self.embeddings(pixel_values), None, dropout_rng))
        return (None if pooled_only else hidden), self.head(hidden)


def hf_rules(config: SiglipVisionConfig) -> list[Rule]:
    """transformers' SiglipVisionModel / Siglip2VisionModel (SiglipModel.vision_model)."""
    patch = (linear_rule("embeddings.patch_embedding", "embeddings.patch_embedding") if config.patch_linear else
             [Rule("embeddings.patch_embedding.weight", "embeddings.patch_embedding", "conv"),
              Rule("embeddings.patch_embedding.bias", "embeddings.patch_bias")])
    return [
        *patch,
        *embedding("embeddings.position_embedding", "embeddings.position_embedding"),
        *_hf_layer("encoder.layers"),
        *norm("post_layernorm", "post_layernorm"),
        Rule("head.probe", "head.probe"),
        *fused_linear("head.attention.in_proj", [f"head.attention.{p}_proj" for p in "qkv"], sep="_"),
        *linear_rule("head.attention.out_proj", "head.attention.out_proj"),
        *norm("head.layernorm", "head.layernorm"),
        *linear_rule("head.mlp.fc1", "head.mlp.fc1"),
        *linear_rule("head.mlp.fc2", "head.mlp.fc2"),
    ]


def conversion_rules(config: SiglipVisionConfig, fmt: str) -> list[Rule]:
    return {"hf": hf_rules}[fmt](config)


for _config_class, _types in ((SiglipVisionConfig, ("siglip_vision_model", "siglip")),
                              (Siglip2VisionConfig, ("siglip2_vision_model", "siglip2"))):
    register(TowerSpec(_config_class.model_type, "vision", _config_class, SiglipVisionTower, conversion_rules,
                       prefixes={"hf": ("vision_model.", "")}, model_types=_types,
                       preprocess=SIGLIP_PREPROCESS))
