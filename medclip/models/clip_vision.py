"""Vision transformer (ViT) tower: CLIP's (transformers and OpenCLIP layouts) and, with other options, timm's.

The pooled output is the [CLS] token after the final layer norm. The three layouts differ only in details
held by the config: a bias on the patch projection (timm), a layer norm before the encoder (CLIP), the
activation and the norm epsilon.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Self

import jax
import jax.numpy as jnp
from flax import nnx

from medclip.models.config_base import VisionTowerConfig
from medclip.models.kernels import dense
from medclip.models.layers import pre_norm_encoder
from medclip.models.preprocess import CLIP_PREPROCESS, Preprocess
from medclip.models.registry import register
from medclip.models.tower_contract import TowerSpec
from medclip.models.weights import Rule, embedding, fused_linear, linear, norm


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(VisionTowerConfig):
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
    patch_bias: ClassVar[bool] = False
    pre_layernorm: ClassVar[bool] = True
    default_preprocess: ClassVar[Preprocess] = CLIP_PREPROCESS

    @property
    def stochastic(self) -> bool:
        return self.attention_dropout > 0

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


def patchify(pixel_values: jax.Array, config: Any, dtype) -> jax.Array:
    """(batch, grid^2, patch * patch * channels) from NHWC pixels of the config's size, each patch flattened in
    (row, column, channel) order: a conv kernel's HWIO order, and SigLIP 2's flattened patches."""
    batch, height, width, channels = pixel_values.shape
    size, p = config.image_size, config.patch_size
    if channels != config.num_channels or height != size or width != size:
        raise ValueError(
            f"pixel_values must be NHWC (batch, {size}, {size}, {config.num_channels}) for this vision config, "
            f"got {pixel_values.shape}; NCHW input needs a transpose to NHWC")
    grid = size // p
    x = pixel_values[:, : grid * p, : grid * p].astype(dtype)
    patches = x.reshape(batch, grid, p, grid, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return patches.reshape(batch, grid * grid, p * p * channels)


class VisionEmbeddings(nnx.Module):
    def __init__(self, config: CLIPVisionConfig, *, dtype, rngs: nnx.Rngs):
        p, c, d = config.patch_size, config.num_channels, config.hidden_size
        init = jax.nn.initializers.normal(0.02)
        # (patch_h, patch_w, channels, hidden): the conv kernel in HWIO, applied as one matmul over patches.
        self.patch_embedding = nnx.Param(init(rngs.params(), (p, p, c, d)))
        self.patch_bias = nnx.Param(jnp.zeros((d,))) if config.patch_bias else None
        self.class_embedding = nnx.Param(init(rngs.params(), (d,)))
        self.position_embedding = nnx.Embed(config.num_patches + 1, d, rngs=rngs)
        self.config = config
        self.dtype = dtype

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        patches = patchify(pixel_values, self.config, self.dtype)
        kernel = self.patch_embedding[...].reshape(patches.shape[-1], -1).astype(self.dtype)
        bias = None if self.patch_bias is None else self.patch_bias[...].astype(self.dtype)
        embeds = dense(patches, kernel, bias)  # (batch, patches, hidden)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (embeds.shape[0], 1, embeds.shape[-1]))
        embeds = jnp.concatenate([cls, embeds], axis=1)
        return embeds + self.position_embedding.embedding[...].astype(self.dtype)[None]


class VisionTransformer(nnx.Module):
    """Returns (last_hidden_state, pooled_output) like transformers' CLIPVisionModel."""

    def __init__(self, config: CLIPVisionConfig, *, dtype=jnp.float32, remat: bool = False, rngs: nnx.Rngs):
        self.config = config
        d, eps = config.hidden_size, config.layer_norm_eps
        self.embeddings = VisionEmbeddings(config, dtype=dtype, rngs=rngs)
        self.pre_layernorm = (nnx.LayerNorm(d, epsilon=eps, dtype=dtype, rngs=rngs)
                              if config.pre_layernorm else None)
        self.encoder = pre_norm_encoder(config, dtype=dtype, remat=remat, rngs=rngs)
        self.post_layernorm = nnx.LayerNorm(d, epsilon=eps, dtype=dtype, rngs=rngs)

    def __call__(self, pixel_values: jax.Array, *, dropout_rng: jax.Array | None = None,
                 pooled_only: bool = False, train: bool = False):
        """`pooled_only` skips the last layer's work for every token but CLS (last_hidden_state is then None).
        `train` is part of the tower convention (BatchNorm towers use it); a ViT has nothing that depends on it."""
        hidden = self.embeddings(pixel_values)
        if self.pre_layernorm is not None:
            hidden = self.pre_layernorm(hidden)
        cls_rows = jnp.zeros(hidden.shape[0], jnp.int32) if pooled_only else None
        hidden = self.encoder(hidden, None, dropout_rng, cls_rows)
        pooled = self.post_layernorm(hidden[:, 0])
        return (None if pooled_only else hidden), pooled


CLIPVisionTower = VisionTransformer  # the name the rest of the package and users know


def _hf_layer(hf: str) -> list[Rule]:
    layer, ours = f"{hf}.{{i}}", "encoder.layers.{i}"
    return [
        *norm(f"{layer}.layer_norm1", f"{ours}.layer_norm1"),
        *[r for p in "qkv" for r in linear(f"{layer}.self_attn.{p}_proj", f"{ours}.self_attn.{p}_proj")],
        *linear(f"{layer}.self_attn.out_proj", f"{ours}.self_attn.out_proj"),
        *norm(f"{layer}.layer_norm2", f"{ours}.layer_norm2"),
        *linear(f"{layer}.mlp.fc1", f"{ours}.mlp.fc1"),
        *linear(f"{layer}.mlp.fc2", f"{ours}.mlp.fc2"),
    ]


def openclip_resblock(hf: str) -> list[Rule]:
    """OpenCLIP's `ResidualAttentionBlock` (ln_1, nn.MultiheadAttention with fused in_proj, ln_2, c_fc/c_proj)."""
    layer, ours = f"{hf}.{{i}}", "encoder.layers.{i}"
    qkv = [f"{ours}.self_attn.{p}_proj" for p in "qkv"]
    return [
        *norm(f"{layer}.ln_1", f"{ours}.layer_norm1"),
        *fused_linear(f"{layer}.attn.in_proj", qkv, sep="_"),
        *linear(f"{layer}.attn.out_proj", f"{ours}.self_attn.out_proj"),
        *norm(f"{layer}.ln_2", f"{ours}.layer_norm2"),
        *linear(f"{layer}.mlp.c_fc", f"{ours}.mlp.fc1"),
        *linear(f"{layer}.mlp.c_proj", f"{ours}.mlp.fc2"),
    ]


# transformers' CLIPVisionModel / CLIPModel.vision_model
HF_RULES = [
    Rule("embeddings.patch_embedding.weight", "embeddings.patch_embedding", "conv"),
    Rule("embeddings.class_embedding", "embeddings.class_embedding"),
    *embedding("embeddings.position_embedding", "embeddings.position_embedding", "position"),
    *norm("pre_layrnorm", "pre_layernorm"),  # sic: transformers' spelling
    *_hf_layer("encoder.layers"),
    *norm("post_layernorm", "post_layernorm"),
]

# OpenCLIP's VisionTransformer (`visual.*` of an open_clip CLIP); its `proj` belongs to the head
OPENCLIP_RULES = [
    Rule("conv1.weight", "embeddings.patch_embedding", "conv"),
    Rule("class_embedding", "embeddings.class_embedding"),
    Rule("positional_embedding", "embeddings.position_embedding.embedding", "position"),
    *norm("ln_pre", "pre_layernorm"),
    *openclip_resblock("transformer.resblocks"),
    *norm("ln_post", "post_layernorm"),
]

# timm's VisionTransformer (`visual.trunk.*` of an open_clip TimmModel, or a timm checkpoint itself)
TIMM_RULES = [
    Rule("patch_embed.proj.weight", "embeddings.patch_embedding", "conv"),
    Rule("patch_embed.proj.bias", "embeddings.patch_bias"),
    Rule("cls_token", "embeddings.class_embedding", "cls_token"),
    Rule("pos_embed", "embeddings.position_embedding.embedding", "batched_position"),
    *norm("blocks.{i}.norm1", "encoder.layers.{i}.layer_norm1"),
    *fused_linear("blocks.{i}.attn.qkv", [f"encoder.layers.{{i}}.self_attn.{p}_proj" for p in "qkv"]),
    *linear("blocks.{i}.attn.proj", "encoder.layers.{i}.self_attn.out_proj"),
    *norm("blocks.{i}.norm2", "encoder.layers.{i}.layer_norm2"),
    *linear("blocks.{i}.mlp.fc1", "encoder.layers.{i}.mlp.fc1"),
    *linear("blocks.{i}.mlp.fc2", "encoder.layers.{i}.mlp.fc2"),
    *norm("norm", "post_layernorm"),
]


def conversion_rules(config: CLIPVisionConfig, fmt: str) -> list[Rule]:
    del config
    return {"hf": HF_RULES, "openclip": OPENCLIP_RULES}[fmt]


register(TowerSpec("clip_vision_model", "vision", CLIPVisionConfig, VisionTransformer, conversion_rules,
                   prefixes={"hf": ("vision_model.", ""), "openclip": ("visual.",)},
                   model_types=("clip_vision_model", "clip"), preprocess=CLIPVisionConfig.default_preprocess))
