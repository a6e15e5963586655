"""CLIP text transformer tower: causal attention, pooled output at the end-of-text token."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Self

import jax
import jax.numpy as jnp
from flax import nnx

from medclip.models.clip_vision import _hf_layer, openclip_resblock
from medclip.models.config_base import TextTowerConfig
from medclip.models.layers import attention_bias, pool_encoder, pooled_rows, pre_norm_encoder
from medclip.models.packing import PackingPlan, make_packing
from medclip.models.registry import register
from medclip.models.tower_contract import TowerSpec
from medclip.models.weights import Rule, embedding, norm


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(TextTowerConfig):
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    # eos: pool at the first eos_token_id (transformers); argmax: at the highest token id (OpenCLIP, and
    # transformers for legacy configs that say eos_token_id=2), which is the end-of-text token of CLIP's vocabulary
    pool_type: str = "eos"

    model_type: ClassVar[str] = "clip_text_model"

    @property
    def stochastic(self) -> bool:
        return self.attention_dropout > 0

    def __post_init__(self):
        if self.pool_type not in ("eos", "argmax"):
            raise ValueError(f"CLIP text pool_type {self.pool_type!r} is not supported; supported: eos, argmax")

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> Self:
        if data.get("model_type") == "clip" or "text_config" in data:
            data = data["text_config"]
        return super().from_hf_dict(data)

    @classmethod
    def tiny(cls) -> Self:
        return cls(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=16, pad_token_id=1, bos_token_id=97,
                   eos_token_id=98)


class CLIPTextTower(nnx.Module):
    """Returns (last_hidden_state, pooled_output) like transformers' CLIPTextModel."""

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, remat: bool = False, rngs: nnx.Rngs):
        self.config = config
        d, eps = config.hidden_size, config.layer_norm_eps
        self.token_embedding = nnx.Embed(config.vocab_size, d, dtype=dtype, rngs=rngs)
        self.position_embedding = nnx.Embed(config.max_position_embeddings, d, dtype=dtype, rngs=rngs)
        self.encoder = pre_norm_encoder(config, dtype=dtype, remat=remat, rngs=rngs)
        self.final_layer_norm = nnx.LayerNorm(d, epsilon=eps, dtype=dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 dropout_rng: jax.Array | None = None, pooled_only: bool = False,
                 packing: PackingPlan | None = None, pooler: str = "default", **unused: Any):
        """`pooled_only` skips the last layer's work for every token but the pooled one (last_hidden_state is
        then None); `packing` runs the layers on the real tokens only (medclip.models.packing); `pooler` is
        eos (the default), cls (first token) or mean (over real tokens)."""
        length = input_ids.shape[1]
        if length > self.config.max_position_embeddings:
            raise ValueError(f"input_ids has {length} tokens; this CLIP text tower takes at most "
                             f"{self.config.max_position_embeddings} (max_position_embeddings)")
        hidden = self.token_embedding(input_ids) + self.position_embedding.embedding[...][:length].astype(self.dtype)
        bias = attention_bias(attention_mask, length, jnp.float32)
        packed = None if packing is None else make_packing(attention_mask, packing)
        rows = pooled_rows(pooler, {"default": "eos"}, lambda: self._eos_positions(input_ids), input_ids,
                           allowed=("eos", "cls", "mean"))
        return pool_encoder(lambda r: self.final_layer_norm(self.encoder(hidden, bias, dropout_rng, r, packed)),
                            rows, pooled_only, attention_mask)

    def _eos_positions(self, input_ids: jax.Array) -> jax.Array:
        # Legacy CLIP configs say eos_token_id=2 although EOS is the highest id: transformers then
        # pools at argmax(input_ids); otherwise at the first EOS token.
        if self.config.eos_token_id == 2 or self.config.pool_type == "argmax":
            return jnp.argmax(input_ids, axis=-1)
        return jnp.argmax((input_ids == self.config.eos_token_id).astype(jnp.int32), axis=-1)


HF_RULES = [
    *embedding("embeddings.token_embedding", "token_embedding"),
    *embedding("embeddings.position_embedding", "position_embedding"),
    *_hf_layer("encoder.layers"),
    *norm("final_layer_norm", "final_layer_norm"),
]

# OpenCLIP's builtin text transformer, at the top level of an open_clip CLIP (`text_projection` is the head's)
OPENCLIP_RULES = [
    *embedding("token_embedding", "token_embedding"),
    Rule("positional_embedding", "position_embedding.embedding"),
    *openclip_resblock("transformer.resblocks"),
    *norm("ln_final", "final_layer_norm"),
]


def conversion_rules(config: CLIPTextConfig, fmt: str) -> list[Rule]:
    del config
    return {"hf": HF_RULES, "openclip": OPENCLIP_RULES}[fmt]


register(TowerSpec("clip_text_model", "text", CLIPTextConfig, CLIPTextTower, conversion_rules,
                   prefixes={"hf": ("text_model.", ""), "openclip": ("",)}, model_types=("clip_text_model",)))
