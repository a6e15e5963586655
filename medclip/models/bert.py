"""BERT-family text tower: BERT, RoBERTa and DistilBERT checkpoints (SciBERT, PubMedBERT, BioClinicalBERT,
MiniLM, ... are BERTs).

The three differ only in embeddings (token types, RoBERTa's padding-offset positions) and the pooler
(DistilBERT has none: its pooled output is the [CLS] hidden state, as the original medclip used).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Self

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medclip.models.config_base import TextTowerConfig
from medclip.models.layers import (Encoder, PostNormLayer, attention_bias, dropout, pool_encoder, pooled_rows,
                                   split_rng)
from medclip.models.packing import PackingPlan, make_packing
from medclip.models.registry import register
from medclip.models.tower_contract import TowerSpec
from medclip.models.weights import Rule, embedding, linear, norm

BERT_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert")
# DistilBERT's config.json spells the same fields differently.
_DISTILBERT_NAMES = {
    "dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
    "hidden_dim": "intermediate_size", "activation": "hidden_act", "dropout": "hidden_dropout_prob",
    "attention_dropout": "attention_probs_dropout_prob",
}


@dataclasses.dataclass(frozen=True)
class BertConfig(TextTowerConfig):
    model_type: str = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    position_embedding_type: str = "absolute"
    sinusoidal_pos_embds: bool = False
    add_pooling_layer: bool = True  # open_clip builds its HF text towers without one unless it pools with it

    def __post_init__(self):
        if self.model_type not in BERT_MODEL_TYPES:
            raise ValueError(f"BertConfig does not cover model_type {self.model_type!r}; "
                             f"supported: {BERT_MODEL_TYPES}")
        if self.position_embedding_type != "absolute":
            raise ValueError(f"position_embedding_type {self.position_embedding_type!r} is not supported "
                             "(only 'absolute', which every supported checkpoint uses)")

    @property
    def stochastic(self) -> bool:
        return self.hidden_dropout_prob > 0 or self.attention_probs_dropout_prob > 0

    @property
    def is_distilbert(self) -> bool:
        return self.model_type == "distilbert"

    @property
    def is_roberta(self) -> bool:
        return self.model_type in ("roberta", "xlm-roberta", "camembert")

    @property
    def has_pooler(self) -> bool:
        return not self.is_distilbert and self.add_pooling_layer

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> Self:
        data = dict(data)
        if data.get("model_type") == "distilbert":
            data = {_DISTILBERT_NAMES.get(k, k): v for k, v in data.items()}
            data["type_vocab_size"] = 0
        return super().from_hf_dict(data)

    def to_hf_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.is_distilbert:
            inverse = {v: k for k, v in _DISTILBERT_NAMES.items()}
            data = {inverse.get(k, k): v for k, v in data.items()
                    if k not in ("type_vocab_size", "layer_norm_eps", "position_embedding_type")}
        else:
            data.pop("sinusoidal_pos_embds")
        if self.add_pooling_layer:
            data.pop("add_pooling_layer")
        return data

    @classmethod
    def tiny(cls, model_type: str = "bert") -> Self:
        return cls(model_type=model_type, vocab_size=99, hidden_size=32, num_hidden_layers=2,
                   num_attention_heads=4, intermediate_size=64, max_position_embeddings=40,
                   type_vocab_size=0 if model_type == "distilbert" else (1 if model_type != "bert" else 2),
                   pad_token_id=1 if model_type in ("roberta", "xlm-roberta", "camembert") else 0)


def _sinusoidal_table(positions: int, dim: int) -> np.ndarray:
    angles = np.arange(positions)[:, None] / np.power(10000, 2 * (np.arange(dim)[None] // 2) / dim)
    table = np.zeros((positions, dim), np.float32)
    table[:, 0::2], table[:, 1::2] = np.sin(angles[:, 0::2]), np.cos(angles[:, 1::2])
    return table


class BertEmbeddings(nnx.Module):
    def __init__(self, config: BertConfig, *, dtype, rngs: nnx.Rngs):
        d = config.hidden_size
        init = jax.nn.initializers.normal(0.02)
        self.word_embeddings = nnx.Embed(config.vocab_size, d, dtype=dtype, embedding_init=init, rngs=rngs)
        self.position_embeddings = nnx.Embed(config.max_position_embeddings, d, dtype=dtype,
                                             embedding_init=init, rngs=rngs)
        if config.sinusoidal_pos_embds:
            self.position_embeddings.embedding[...] = jnp.asarray(
                _sinusoidal_table(config.max_position_embeddings, d))
        self.token_type_embeddings = (
            nnx.Embed(config.type_vocab_size, d, dtype=dtype, embedding_init=init, rngs=rngs)
            if config.type_vocab_size else None)
        self.layer_norm = nnx.LayerNorm(d, epsilon=config.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.config = config

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array | None,
                 position_ids: jax.Array | None) -> jax.Array:
        if position_ids is None:
            position_ids = self._default_positions(input_ids)
        hidden = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = jnp.zeros_like(input_ids)
            hidden = hidden + self.token_type_embeddings(token_type_ids)
        return self.layer_norm(hidden)

    def _default_positions(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        length = input_ids.shape[1]
        if cfg.is_roberta:
            # RoBERTa numbers real tokens from pad_token_id + 1 and gives padding the pad position.
            not_pad = (input_ids != cfg.pad_token_id).astype(jnp.int32)
            positions = jnp.cumsum(not_pad, axis=1) * not_pad + cfg.pad_token_id
        else:
            positions = jnp.broadcast_to(jnp.arange(length), input_ids.shape)
        limit = cfg.max_position_embeddings
        needed = length + (cfg.pad_token_id + 1 if cfg.is_roberta else 0)
        if needed > limit:
            raise ValueError(f"input_ids has {length} tokens; this {cfg.model_type} tower takes at most "
                             f"{limit - (needed - length)} (max_position_embeddings={limit})")
        return positions


class BertTower(nnx.Module):
    """Returns (last_hidden_state, pooled_output) like transformers' BertModel/RobertaModel.

    DistilBERT has no pooler; its pooled output is the [CLS] hidden state.
    """

    def __init__(self, config: BertConfig, *, dtype=jnp.float32, remat: bool = False, rngs: nnx.Rngs):
        self.config = config
        d = config.hidden_size
        self.embeddings = BertEmbeddings(config, dtype=dtype, rngs=rngs)
        self.encoder = Encoder([
            PostNormLayer(d, config.num_attention_heads, config.intermediate_size, config.hidden_act,
                          config.layer_norm_eps, config.hidden_dropout_prob, config.attention_probs_dropout_prob,
                          dtype=dtype, rngs=rngs)
            for _ in range(config.num_hidden_layers)
        ], remat=remat)
        self.pooler = nnx.Linear(d, d, dtype=dtype, rngs=rngs) if config.has_pooler else None

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None, position_ids: jax.Array | None = None, *,
                 dropout_rng: jax.Array | None = None, pooled_only: bool = False,
                 packing: PackingPlan | None = None, pooler: str = "default"):
        """`pooled_only` skips the last layer's work for every token but the pooled one (last_hidden_state is
        then None); `packing` runs the layers on the real tokens only (medclip.models.packing). `pooler`:
        pooler_output (BERT's dense + tanh over [CLS]; the default where the checkpoint has a pooler), cls (the
        [CLS] hidden state, as BiomedCLIP and DistilBERT use) or mean (over real tokens)."""
        embed_rng, encoder_rng = split_rng(dropout_rng, 2)
        hidden = self.embeddings(input_ids, token_type_ids, position_ids)
        hidden = dropout(hidden, self.config.hidden_dropout_prob, embed_rng)
        packed = None if packing is None else make_packing(attention_mask, packing)
        bias = attention_bias(attention_mask, None, jnp.float32)
        kind = {"default": "pooler_output" if self.pooler is not None else "cls"}.get(pooler, pooler)
        if kind == "pooler_output" and self.pooler is None:
            raise ValueError("pooler 'pooler_output' needs a BERT pooler, which this tower (DistilBERT) has not")
        rows = pooled_rows(kind, {"pooler_output": "cls"}, lambda: None, input_ids, allowed=("cls", "mean"))
        hidden, pooled = pool_encoder(lambda r: self.encoder(hidden, bias, encoder_rng, r, packed), rows,
                                      pooled_only, attention_mask)
        if kind == "pooler_output":
            pooled = jnp.tanh(self.pooler(pooled))
        return hidden, pooled


_BERT_EMBEDDINGS = [
    *embedding("embeddings.word_embeddings", "embeddings.word_embeddings"),
    *embedding("embeddings.position_embeddings", "embeddings.position_embeddings"),
    *norm("embeddings.LayerNorm", "embeddings.layer_norm"),
]

BERT_RULES = [
    *_BERT_EMBEDDINGS,
    *embedding("embeddings.token_type_embeddings", "embeddings.token_type_embeddings"),
    *linear("encoder.layer.{i}.attention.self.query", "encoder.layers.{i}.self_attn.q_proj"),
    *linear("encoder.layer.{i}.attention.self.key", "encoder.layers.{i}.self_attn.k_proj"),
    *linear("encoder.layer.{i}.attention.self.value", "encoder.layers.{i}.self_attn.v_proj"),
    *linear("encoder.layer.{i}.attention.output.dense", "encoder.layers.{i}.self_attn.out_proj"),
    *norm("encoder.layer.{i}.attention.output.LayerNorm", "encoder.layers.{i}.attention_norm"),
    *linear("encoder.layer.{i}.intermediate.dense", "encoder.layers.{i}.mlp.fc1"),
    *linear("encoder.layer.{i}.output.dense", "encoder.layers.{i}.mlp.fc2"),
    *norm("encoder.layer.{i}.output.LayerNorm", "encoder.layers.{i}.output_norm"),
    *linear("pooler.dense", "pooler"),
]

DISTILBERT_RULES = [
    *_BERT_EMBEDDINGS,
    *[r for p in "qkv" for r in linear(f"transformer.layer.{{i}}.attention.{p}_lin",
                                        f"encoder.layers.{{i}}.self_attn.{p}_proj")],
    *linear("transformer.layer.{i}.attention.out_lin", "encoder.layers.{i}.self_attn.out_proj"),
    *norm("transformer.layer.{i}.sa_layer_norm", "encoder.layers.{i}.attention_norm"),
    *linear("transformer.layer.{i}.ffn.lin1", "encoder.layers.{i}.mlp.fc1"),
    *linear("transformer.layer.{i}.ffn.lin2", "encoder.layers.{i}.mlp.fc2"),
    *norm("transformer.layer.{i}.output_layer_norm", "encoder.layers.{i}.output_norm"),
]


def conversion_rules(config: BertConfig, fmt: str) -> list[Rule]:
    """transformers' BertModel / RobertaModel / DistilBertModel keys; OpenCLIP's HF text tower stores the
    same keys under `text.transformer.` (the prefix is the format's business, not the rules')."""
    if fmt not in ("hf", "openclip"):
        raise KeyError(fmt)
    return DISTILBERT_RULES if config.is_distilbert else BERT_RULES


register(TowerSpec("bert", "text", BertConfig, BertTower, conversion_rules,
                   prefixes={"hf": ("", "bert.", "roberta.", "distilbert.", "text_model.", "model."),
                             "openclip": ("text.transformer.",)},
                   model_types=BERT_MODEL_TYPES))
