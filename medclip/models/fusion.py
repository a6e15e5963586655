"""PMC-CLIP's fusion module and masked-language-modelling head (Lin et al., PMC-CLIP, MICCAI 2023).

PMC-CLIP (github.com/WeixiongLin/PMC-CLIP, src/pmc_clip/model/pmc_clip.py) appends two tokens to the text
tower's last hidden states (batch, length, width): a learned `img_special_token` and the image embedding
itself (its pooled, projected, L2-normalised features: one token, not patch features), runs a small
pre-norm transformer over the sequence (`fusion_module`: open_clip's ResidualAttentionBlocks, GELU,
4 layers, 8 heads in RN50_fusion4), drops the two image tokens and predicts the vocabulary at every text
position with a bias-free `mlm_projection` (width, vocab_size).

The attention mask is the model's (`HybridCLIPConfig.text_attention_mask`): None for PMC-CLIP's own form
(`TextPreprocess(mask_padding=False)`), where captions are padded to 77 tokens and the fusion attends to the [PAD]
states, as PMC-CLIP's `fusion_module(x)` does; with masked padding the padding is masked out here too (the two image
tokens are always attended to), so the predictions do not depend on how a batch is padded.

One choice of ours, a no-op for PMC-CLIP's own configuration: when projection_dim differs from the text width
(PMC-CLIP: both 768) a linear `image_projection` maps the image embedding to the text width; with equal widths
there is none, as in PMC-CLIP.

Parameter names follow PMC-CLIP's checkpoint keys: `fusion_rules` below maps them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Self

import jax
import jax.numpy as jnp
from flax import nnx

from medclip.models.layers import Encoder, PreNormLayer, attention_bias, linear
from medclip.models.weights import Rule
from medclip.models.weights import linear as linear_rule


@dataclasses.dataclass(frozen=True)
class FusionConfig:
    num_layers: int = 4  # text_cfg.fusion_layers (RN50_fusion4.json)
    num_heads: int = 8  # text_cfg.heads
    mlp_ratio: float = 4.0  # open_clip ResidualAttentionBlock default
    hidden_act: str = "gelu"  # nn.GELU (exact): the fusion Transformer is built without quick_gelu
    layer_norm_eps: float = 1e-5  # torch LayerNorm default

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Self | None:
        return None if data is None else cls(**data)


class MLMFusion(nnx.Module):
    """Text hidden states + image embedding -> MLM logits (batch, length, vocab_size)."""

    def __init__(self, config: FusionConfig, text_width: int, image_width: int, vocab_size: int, *, dtype,
                 rngs: nnx.Rngs):
        self.config, self.dtype = config, dtype
        self.image_projection = (nnx.Linear(image_width, text_width, dtype=dtype, rngs=rngs)
                                 if image_width != text_width else None)
        self.img_special_token = nnx.Param(jnp.zeros((1, 1, text_width), jnp.float32))
        self.fusion_module = Encoder([
            PreNormLayer(text_width, config.num_heads, int(text_width * config.mlp_ratio), config.hidden_act,
                         config.layer_norm_eps, 0.0, dtype=dtype, rngs=rngs)
            for _ in range(config.num_layers)])
        init = jax.nn.initializers.normal(text_width ** -0.5)  # PMC-CLIP's init_parameters
        self.mlm_projection = nnx.Param(init(rngs.params(), (text_width, vocab_size), jnp.float32))

    def __call__(self, text_hidden: jax.Array, image_embeds: jax.Array,
                 attention_mask: jax.Array | None) -> jax.Array:
        """text_hidden (batch, length, width), image_embeds (batch, image_width), attention_mask (batch, length)
        or None (every position attended to, PMC-CLIP's form) -> logits (batch, length, vocab_size), fp32."""
        batch, length, width = text_hidden.shape
        image = image_embeds.astype(self.dtype)
        if self.image_projection is not None:
            image = linear(self.image_projection, image)
        special = jnp.broadcast_to(self.img_special_token[...].astype(self.dtype), (batch, 1, width))
        x = jnp.concatenate([text_hidden.astype(self.dtype), special, image[:, None, :]], axis=1)
        mask = None
        if attention_mask is not None:
            mask = jnp.concatenate([attention_mask, jnp.ones((batch, 2), attention_mask.dtype)], axis=1)
        x = self.fusion_module(x, attention_bias(mask, None, jnp.float32))[:, :length]  # drop the image tokens
        return jnp.einsum("bld,dv->blv", x, self.mlm_projection[...].astype(self.dtype),
                          preferred_element_type=jnp.float32)


def fusion_rules(config: FusionConfig, our_prefix: str = "fusion.") -> list[Rule]:
    """PMC-CLIP's keys (`fusion_module.resblocks.{i}.*`, `img_special_token`, `mlm_projection`) -> ours. The
    `mlm_projection` is a plain (width, vocab) matrix in PMC-CLIP, used as x @ W: no transpose."""
    del config
    layer, ours = "fusion_module.resblocks.{i}", f"{our_prefix}fusion_module.layers.{{i}}"
    qkv = [f"{ours}.self_attn.{p}_proj" for p in "qkv"]
    return [
        Rule(f"{layer}.ln_1.weight", f"{ours}.layer_norm1.scale"),
        Rule(f"{layer}.ln_1.bias", f"{ours}.layer_norm1.bias"),
        *[Rule(f"{layer}.attn.in_proj_weight", f"{o}.kernel", "linear", (i, 3)) for i, o in enumerate(qkv)],
        *[Rule(f"{layer}.attn.in_proj_bias", f"{o}.bias", "identity", (i, 3)) for i, o in enumerate(qkv)],
        *linear_rule(f"{layer}.attn.out_proj", f"{ours}.self_attn.out_proj"),
        Rule(f"{layer}.ln_2.weight", f"{ours}.layer_norm2.scale"),
        Rule(f"{layer}.ln_2.bias", f"{ours}.layer_norm2.bias"),
        *linear_rule(f"{layer}.mlp.c_fc", f"{ours}.mlp.fc1"),
        *linear_rule(f"{layer}.mlp.c_proj", f"{ours}.mlp.fc2"),
        Rule("img_special_token", f"{our_prefix}img_special_token"),
        Rule("mlm_projection", f"{our_prefix}mlm_projection"),
        *linear_rule("fusion_image_projection", f"{our_prefix}image_projection"),  # ours only (widths differ)
    ]
