"""Projection heads: what turns a tower's pooled output into the shared embedding space.

CLIP projects with one bias-free linear layer; BiomedCLIP's text side with a 2-layer MLP (open_clip's
`hf_proj_type: mlp`); some models with a biased linear layer or none at all. The pooler (which token or
average a text tower hands to its head) is part of the head's configuration, as in open_clip.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Self

import jax
from flax import nnx

from medclip.models.layers import activation, dropout, linear

HEAD_TYPES = ("linear", "mlp", "none")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    type: str = "linear"  # linear | mlp | none (the pooled output is the embedding: needs width == projection_dim)
    bias: bool = False  # on the (last) linear layer
    hidden_size: int | None = None  # mlp only
    hidden_bias: bool = True  # mlp only: bias on the first layer
    hidden_act: str = "gelu"  # mlp only
    pooler: str = "default"  # which pooled output of the tower: default | cls | eos | mean | pooler_output
    dropout: float = 0.0  # on the pooled output, before projecting, in training

    def __post_init__(self):
        if self.type not in HEAD_TYPES:
            raise ValueError(f"head type {self.type!r} is not supported; supported: {HEAD_TYPES}")
        if self.type == "mlp" and not self.hidden_size:
            raise ValueError("an mlp head needs hidden_size")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"head dropout must be in [0, 1), got {self.dropout}")
        activation(self.hidden_act)  # fails early, naming the supported ones

    def to_dict(self) -> dict[str, Any]:
        default = HeadConfig()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(default, f.name)}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Self:
        return cls(**(data or {}))


class MLPHead(nnx.Module):
    def __init__(self, width: int, config: HeadConfig, out: int, *, dtype, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(width, config.hidden_size, use_bias=config.hidden_bias, dtype=dtype, rngs=rngs)
        self.fc2 = nnx.Linear(config.hidden_size, out, use_bias=config.bias, dtype=dtype, rngs=rngs)
        self.act = activation(config.hidden_act)

    def __call__(self, x: jax.Array) -> jax.Array:
        return linear(self.fc2, self.act(linear(self.fc1, x)))


def build_head(width: int, config: HeadConfig, out: int, *, dtype, rngs: nnx.Rngs) -> nnx.Module | None:
    """None for `type: none`; fresh heads start as CLIP's do (normal(0.02), zero bias)."""
    if config.type == "none":
        if width != out:
            raise ValueError(f"a head of type 'none' passes the pooled output through, so the tower's width "
                             f"({width}) must equal projection_dim ({out})")
        return None
    init = jax.nn.initializers.normal(0.02)
    if config.type == "linear":
        return nnx.Linear(width, out, use_bias=config.bias, dtype=dtype, kernel_init=init, rngs=rngs)
    return MLPHead(width, config, out, dtype=dtype, rngs=rngs)


def project(head: nnx.Module | None, config: HeadConfig, pooled: jax.Array, rng: jax.Array | None) -> jax.Array:
    pooled = dropout(pooled, config.dropout, rng)
    if head is None:
        return pooled
    if isinstance(head, MLPHead):
        return head(pooled)
    return linear(head, pooled)
