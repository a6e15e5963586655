"""Building blocks shared by the towers: attention, MLPs, encoder layers in pre- and post-norm form.

Module attribute names follow the CLIP naming of Hugging Face checkpoints where that is natural, so the
conversion tables in `medclip.checkpoints` stay short and readable.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


def _quick_gelu(x: Array) -> Array:
    return x * jax.nn.sigmoid(1.702 * x)


# Names as Hugging Face configs spell them (`hidden_act` / DistilBERT's `activation`).
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": _quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str) -> Callable[[Array], Array]:
    """Looks an activation up by its Hugging Face name, failing with the list of supported ones."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}") from None


def dropout(x: Array, rate: float, rng: Array | None) -> Array:
    """Inverted dropout; a `None` key means inference, so evaluation never needs a key."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def split_rng(rng: Array | None, n: int) -> list[Array | None]:
    """Splits a dropout key, passing `None` through so callers need no branches."""
    if rng is None:
        return [None] * n
    return list(jax.random.split(rng, n))


def attention_bias(attention_mask: Array | None, causal_length: int | None, dtype) -> Array | None:
    """Additive bias (batch, 1, q, k) from a padding mask (batch, k) and/or a causal mask.

    The most negative finite value (not -inf) keeps fully padded rows finite, as transformers does.
    """
    big_negative = jnp.finfo(dtype).min
    bias = None
    if attention_mask is not None:
        bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, big_negative).astype(dtype)
    if causal_length is not None:
        causal = jnp.tril(jnp.ones((causal_length, causal_length), dtype=bool))
        causal_bias = jnp.where(causal, 0.0, big_negative).astype(dtype)[None, None]
        bias = causal_bias if bias is None else jnp.maximum(bias + causal_bias, big_negative)
    return bias


class SelfAttention(nnx.Module):
    """Multi-head self-attention with biased q/k/v/out projections (CLIP and BERT share this form)."""

    def __init__(self, hidden_size: int, num_heads: int, dropout_rate: float, *, dtype, rngs: nnx.Rngs):
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.dropout_rate = dropout_rate
        self.dtype = dtype
        linear = lambda: nnx.Linear(hidden_size, hidden_size, dtype=dtype, rngs=rngs)  # noqa: E731
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = linear(), linear(), linear(), linear()

    def __call__(self, x: Array, bias: Array | None, rng: Array | None = None) -> Array:
        batch, length, _ = x.shape
        heads = lambda t: t.reshape(batch, length, self.num_heads, self.head_dim)  # noqa: E731
        # Scaling q before the product is cheaper than scaling the (q, k) scores.
        q = heads(self.q_proj(x) * (1.0 / math.sqrt(self.head_dim)))
        k, v = heads(self.k_proj(x)), heads(self.v_proj(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)  # (b, h, q, k)
        if bias is not None:
            scores = scores + bias
        probs = jax.nn.softmax(scores, axis=-1)
        probs = dropout(probs, self.dropout_rate, rng).astype(v.dtype)
        context = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, length, -1)
        return self.out_proj(context)


class MLP(nnx.Module):
    """Two-layer feed-forward block; names `fc1`/`fc2` as in CLIP."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str, *, dtype, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(hidden_size, intermediate_size, dtype=dtype, rngs=rngs)
        self.fc2 = nnx.Linear(intermediate_size, hidden_size, dtype=dtype, rngs=rngs)
        self.act = activation(act)

    def __call__(self, x: Array) -> Array:
        return self.fc2(self.act(self.fc1(x)))


class PreNormLayer(nnx.Module):
    """CLIP encoder layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, act: str, eps: float,
                 attention_dropout: float, *, dtype, rngs: nnx.Rngs):
        self.layer_norm1 = nnx.LayerNorm(hidden_size, epsilon=eps, dtype=dtype, rngs=rngs)
        self.self_attn = SelfAttention(hidden_size, num_heads, attention_dropout, dtype=dtype, rngs=rngs)
        self.layer_norm2 = nnx.LayerNorm(hidden_size, epsilon=eps, dtype=dtype, rngs=rngs)
        self.mlp = MLP(hidden_size, intermediate_size, act, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array, bias: Array | None, rng: Array | None = None) -> Array:
        x = x + self.self_attn(self.layer_norm1(x), bias, rng)
        return x + self.mlp(self.layer_norm2(x))


class PostNormLayer(nnx.Module):
    """BERT encoder layer: ln(x + dropout(attn(x))), then ln(x + dropout(mlp(x)))."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, act: str, eps: float,
                 hidden_dropout: float, attention_dropout: float, *, dtype, rngs: nnx.Rngs):
        self.self_attn = SelfAttention(hidden_size, num_heads, attention_dropout, dtype=dtype, rngs=rngs)
        self.attention_norm = nnx.LayerNorm(hidden_size, epsilon=eps, dtype=dtype, rngs=rngs)
        self.mlp = MLP(hidden_size, intermediate_size, act, dtype=dtype, rngs=rngs)
        self.output_norm = nnx.LayerNorm(hidden_size, epsilon=eps, dtype=dtype, rngs=rngs)
        self.hidden_dropout = hidden_dropout

    def __call__(self, x: Array, bias: Array | None, rng: Array | None = None) -> Array:
        attn_rng, hidden_rng1, hidden_rng2 = split_rng(rng, 3)
        attended = dropout(self.self_attn(x, bias, attn_rng), self.hidden_dropout, hidden_rng1)
        x = self.attention_norm(x + attended)
        return self.output_norm(x + dropout(self.mlp(x), self.hidden_dropout, hidden_rng2))


class Encoder(nnx.Module):
    """A stack of layers run as a Python loop (unrolled), optionally rematerialised layer by layer.

    Unrolled layers measured faster than `lax.scan` on CPU (../shared/PERF_NOTES.md); remat trades
    compute for activation memory on large towers.
    """

    def __init__(self, layers: list[nnx.Module], remat: bool = False):
        self.layers = nnx.List(layers)
        self.remat = remat

    def __call__(self, x: Array, bias: Array | None, rng: Array | None = None) -> Array:
        rngs = split_rng(rng, len(self.layers))
        for layer, layer_rng in zip(self.layers, rngs):
            if self.remat:
                x = nnx.remat(lambda module, h, b, r: module(h, b, r))(layer, x, bias, layer_rng)
            else:
                x = layer(x, bias, layer_rng)
        return x
