"""SigLIP's text tower (transformers' SiglipTextModel / Siglip2TextModel without its `head`).

A bidirectional pre-norm transformer with a final layer norm, pooled at the LAST position whatever token is there:
SigLIP tokenises to max_length without an attention mask, so the padding is part of the computation (the model's
`TextPreprocess` says so). The `head` Linear that transformers keeps inside the text model is the HybridCLIP text
projection here (a biased linear head), so a locked tower's pooled output can be cached like any other's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Self

import jax
import jax.numpy as jnp

from medclip.models.clip_text import HF_RULES as CLIP_TEXT_HF_RULES
from medclip.models.clip_text import CLIPTextTower
from medclip.models.config_base import TextTowerConfig
from medclip.models.layers import attention_bias, pool_encoder, pooled_rows
from medclip.models.packing import PackingPlan
from medclip.models.registry import register
from medclip.models.tower_contract import TowerSpec
from medclip.models.weights import Rule


@dataclasses.dataclass(frozen=True)
class SiglipTextConfig(TextTowerConfig):
    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 64
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    pad_token_id: int = 1
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407

    model_type: ClassVar[str] = "siglip_text_model"

    @property
    def stochastic(self) -> bool:
        return self.attention_dropout > 0

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> Self:
        if "text_config" in data:  # a whole SiglipConfig
            data = data["text_config"]
        data = dict(data)
        if isinstance(data.get("eos_token_id"), list):
            data["eos_token_id"] = data["eos_token_id"][0]
        if data.get("pad_token_id") is None:
            data.pop("pad_token_id", None)
        return super().from_hf_dict(data)

    @classmethod
    def tiny(cls) -> Self:
        return cls(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=16, pad_token_id=1, bos_token_id=None, eos_token_id=2)

    @classmethod
    def medsiglip_448(cls) -> Self:
        """google/medsiglip-448's text tower (64 tokens, SentencePiece vocabulary of 32,000)."""
        return cls(vocab_size=32000, hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                   num_attention_heads=16, max_position_embeddings=64)


@dataclasses.dataclass(frozen=True)
class Siglip2TextConfig(SiglipTextConfig):
    """Siglip2TextConfig has SigLIP's fields; only the model type (and its Gemma tokenizer) differ."""

    model_type: ClassVar[str] = "siglip2_text_model"


class SiglipTextTower(CLIPTextTower):
    """Returns (last_hidden_state, pooled_output) like transformers' SiglipTextModel before its `head`. CLIP's
    text transformer's modules (token and position embeddings, pre-norm layers, final layer norm) in another
    computation: no causal mask, pooled at the last position."""

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 dropout_rng: jax.Array | None = None, pooled_only: bool = False,
                 packing: PackingPlan | None = None, pooler: str = "default", **unused: Any):
        """`pooler`: last (the default: the last position, as SigLIP), cls (first token) or mean (over real
        tokens). `packing` is refused: it drops the padding, which the last position usually is."""
        batch, length = input_ids.shape
        if length > self.config.max_position_embeddings:
            raise ValueError(f"input_ids has {length} tokens; this SigLIP text tower takes at most "
                             f"{self.config.max_position_embeddings} (max_position_embeddings)")
        if packing is not None:
            raise ValueError("SigLIP's text tower pools the last position, which packing drops; run it padded")
        hidden = self.token_embedding(input_ids) + self.position_embedding.embedding[...][:length].astype(self.dtype)
        bias = attention_bias(attention_mask, None, jnp.float32)
        rows = pooled_rows(pooler, {"default": "eos", "last": "eos"}, lambda: jnp.full(batch, length - 1, jnp.int32),
                           input_ids, allowed=("eos", "cls", "mean"))
        return pool_encoder(lambda r: self.final_layer_norm(self.encoder(hidden, bias, dropout_rng, r)),
                            rows, pooled_only, attention_mask)


# transformers' SiglipTextModel (SiglipModel.text_model) names its modules as CLIPTextModel does; its `head` is the
# model's text projection
HF_RULES = CLIP_TEXT_HF_RULES


def conversion_rules(config: SiglipTextConfig, fmt: str) -> list[Rule]:
    del config
    return {"hf": HF_RULES}[fmt]


for _config_class, _types in ((SiglipTextConfig, ("siglip_text_model", "siglip")),
                              (Siglip2TextConfig, ("siglip2_text_model", "siglip2"))):
    register(TowerSpec(_config_class.model_type, "text", _config_class, SiglipTextTower, conversion_rules,
                       prefixes={"hf": ("text_model.", "")}, model_types=_types, ignored_keys=r"^head\."))
