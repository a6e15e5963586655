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

from medclip.models import kernels
from medclip.models.packing import Packing

Array = jax.Array


def _quick_gelu(x: Array) -> Array:
    return x * jax.nn.sigmoid(1.702 * x)


# Names as Hugging Face configs spell them (`hidden_act` / DistilBERT's `activation`).
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": kernels.gelu,
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


def linear(layer: nnx.Linear, x: Array) -> Array:
    """Applies an `nnx.Linear` through `kernels.dense`; the module keeps its parameters (and checkpoint names)."""
    dtype = layer.dtype or x.dtype
    bias = layer.bias[...].astype(dtype) if layer.bias is not None else None
    return kernels.dense(x.astype(dtype), layer.kernel[...].astype(dtype), bias)


def _drop(x: Array, rate: float, rng: Array | None, keep_shape: tuple[int, ...]) -> Array:
    """Zeroes `x` where a Bernoulli(1 - rate) draw of `keep_shape` (broadcast over `x`) fails and scales the rest by
    1 / (1 - rate), so the expectation is unchanged; a `None` key means inference."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, keep_shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def dropout(x: Array, rate: float, rng: Array | None) -> Array:
    """Inverted dropout; a `None` key means inference, so evaluation never needs a key."""
    return _drop(x, rate, rng, x.shape)


def drop_path(x: Array, rate: float, rng: Array | None) -> Array:
    """Stochastic depth (timm's DropPath): a residual branch zeroed for whole examples with probability `rate`."""
    return _drop(x, rate, rng, (x.shape[0],) + (1,) * (x.ndim - 1))


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


def take_rows(x: Array, rows: Array | None, packing: Packing | None = None) -> Array:
    """Token rows[b] of each sequence b, keeping a length-1 axis: (batch, 1, ...), from x padded (batch,
    length, ...) or packed (groups, tokens, ...); all of x when `rows` is None."""
    if rows is None:
        return x
    if packing is not None:
        return packing.take(x, rows)
    return jnp.take_along_axis(x, rows.reshape((-1, 1) + (1,) * (x.ndim - 2)), axis=1)


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

    def __call__(self, x: Array, bias: Array | None, rng: Array | None = None, rows: Array | None = None,
                 packing: Packing | None = None) -> Array:
        """Attends from every token, or (with `rows`, one position per sequence) from those tokens only:
        x's shape out, or (batch, 1, hidden). `bias` must then be the rows' own bias. With `packing`, x holds
        packed tokens; only the attention itself runs on the padded layout."""
        padded = (lambda y: y) if packing is None else packing.unpack
        if rows is None:
            q, k, v = self._heads(padded(self._project(x, "qkv")))
        else:
            (q,) = self._heads(self._project(take_rows(x, rows, packing), "q"))
            k, v = self._heads(padded(self._project(x, "kv")))
        if rng is None or self.dropout_rate == 0.0:
            context = kernels.attention(q, k, v, bias)
        else:  # dropout on the probabilities: plain autodiff
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
            probs = jax.nn.softmax(scores if bias is None else scores + bias, axis=-1)
            probs = dropout(probs, self.dropout_rate, rng)
            context = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
        batch, queries = q.shape[:2]
        context = context.reshape(batch, queries, -1)
        if rows is None and packing is not None:
            context = packing.pack(context)
        return linear(self.out_proj, context)

    def _project(self, x: Array, which: str) -> Array:
        """The projections named in `which` ("qkv", "kv", "q") from one matmul: their kernels are concatenated
        inside the traced step (parameters stay separate), so each direction runs one wide matmul instead of
        narrow ones. q is pre-scaled by 1/sqrt(head_dim) through its kernel and bias, cheaper than scaling
        the scores."""
        scale = 1.0 / math.sqrt(self.head_dim)
        projections = [(getattr(self, f"{name}_proj"), scale if name == "q" else 1.0) for name in which]
        kernel = jnp.concatenate([p.kernel[...] * s for p, s in projections], axis=1)
        bias = jnp.concatenate([p.bias[...] * s for p, s in projections])
        return kernels.dense(x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype))

    def _heads(self, projected: Array) -> list[Array]:
        """(batch, length, n * hidden) -> n arrays (batch, length, heads, head_dim)."""
        batch, length, width = projected.shape
        n = width // (self.num_heads * self.head_dim)
        return list(jnp.moveaxis(projected.reshape(batch, length, n, self.num_heads, self.head_dim), 2, 0))


class MLP(nnx.Module):
    """Two-layer feed-forward block; names `fc1`/`fc2` as in CLIP."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str, *, dtype, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(hidden_size, intermediate_size, dtype=dtype, rngs=rngs)
        self.fc2 = nnx.Linear(intermediate_size, hidden_size, dtype=dtype, rngs=rngs)
        self.act = activation(act)

    def __call__(self, x: Array) -> Array:
        return linear(self.fc2, self.act(linear(self.fc1, x)))


class PreNormLayer(nnx.Module):
    """CLIP encoder layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, act: str, eps: float,
                 attention_dropout: float, *, dtype, rngs: nnx.Rngs):
        self.layer_norm1 = nnx.LayerNorm(hidden_size, epsilon=eps, dtype=dtype, rngs=rngs)
        self.self_attn = SelfAttention(hidden_size, num_heads, attention_dropout, dtype=dtype, rngs=rngs)
        self.layer_norm2 = nnx.LayerNorm(hidden_size, epsilon=eps, dtype=dtype, rngs=rngs)
        self.mlp = MLP(hidden_size, intermediate_size, act, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array, bias: Array | None, rng: Array | None = None, rows: Array | None = None,
                 packing: Packing | None = None) -> Array:
        attended = self.self_attn(self.layer_norm1(x), bias, rng, rows, packing)
        x = take_rows(x, rows, packing) + attended
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

    def __call__(self, x: Array, bias: Array | None, rng: Array | None = None, rows: Array | None = None,
                 packing: Packing | None = None) -> Array:
        attn_rng, hidden_rng1, hidden_rng2 = split_rng(rng, 3)
        attended = dropout(self.self_attn(x, bias, attn_rng, rows, packing), self.hidden_dropout, hidden_rng1)
        x = self.attention_norm(take_rows(x, rows, packing) + attended)
        return self.output_norm(x + dropout(self.mlp(x), self.hidden_dropout, hidden_rng2))


class Encoder(nnx.Module):
    """A stack of layers run as a Python loop (unrolled), optionally rematerialised layer by layer.

    Unrolled, XLA sees every layer and schedules across them, and its cost analysis counts every layer
    (`benchmarks/train_step.py` reads it); remat trades compute for activation memory on large towers.
    """

    def __init__(self, layers: list[nnx.Module], remat: bool = False):
        self.layers = nnx.List(layers)
        self.remat = remat

    def __call__(self, x: Array, bias: Array | None, rng: Array | None = None, rows: Array | None = None,
                 packing: Packing | None = None) -> Array:
        """x is padded (batch, length, hidden), and so is the result; with `packing` the layers run on the
        real tokens only, packed on the way in and unpacked on the way out.

        `rows` (one token position per sequence) asks for those tokens' final states only, (batch, 1, hidden):
        a pooled output reads one token, and nothing else in the last layer reaches it but that token's
        query, attention output and MLP (keys and values still come from every token). The last layer then
        costs about a sixth of a full one: a base tower's step does 7% fewer FLOPs, a 4-layer one 20%."""
        rngs = split_rng(rng, len(self.layers))
        if packing is not None:
            x = packing.pack(x)
        last = len(self.layers) - 1
        for i, (layer, layer_rng) in enumerate(zip(self.layers, rngs)):
            layer_rows, layer_bias = (rows, _rows_bias(bias, rows)) if i == last else (None, bias)
            if self.remat:
                x = nnx.remat(lambda module, *args: module(*args))(layer, x, layer_bias, layer_rng, layer_rows,
                                                                   packing)
            else:
                x = layer(x, layer_bias, layer_rng, layer_rows, packing)
        return x if packing is None or rows is not None else packing.unpack(x)


def pre_norm_encoder(config, *, dtype, remat: bool, rngs: nnx.Rngs) -> Encoder:
    """CLIP's and SigLIP's encoder: `num_hidden_layers` pre-norm layers, sized by a config that names its fields
    as transformers' CLIP and SigLIP configs do."""
    return Encoder([
        PreNormLayer(config.hidden_size, config.num_attention_heads, config.intermediate_size, config.hidden_act,
                     config.layer_norm_eps, config.attention_dropout, dtype=dtype, rngs=rngs)
        for _ in range(config.num_hidden_layers)
    ], remat=remat)


def _rows_bias(bias: Array | None, rows: Array | None) -> Array | None:
    """The attention bias (batch or 1, 1, q, k) of the query rows `rows` only; a padding-only bias (q = 1)
    already serves every query."""
    if bias is None or rows is None or bias.shape[2] == 1:
        return bias
    full = jnp.broadcast_to(bias, (rows.shape[0],) + bias.shape[1:])
    return jnp.take_along_axis(full, rows.reshape(-1, 1, 1, 1), axis=2)


POOLERS = ("eos", "cls", "mean", "pooler_output")


def pooled_rows(pooler: str, aliases: dict[str, str], eos: Callable[[], Array], input_ids: Array,
                allowed: tuple[str, ...]) -> Array | None:
    """The token position each sequence is pooled at, (batch,) int32, or None for mean pooling.

    `aliases` names what a tower's "default" (and other names) mean; an unsupported pooler fails here, at trace
    time, naming the tower's options."""
    kind = aliases.get(pooler, pooler)
    if kind not in allowed:
        raise ValueError(f"pooler {pooler!r} is not supported by this tower; supported: default, {', '.join(allowed)}")
    if kind == "mean":
        return None
    if kind == "eos":
        return eos()
    return jnp.zeros(input_ids.shape[0], jnp.int32)


def pool_encoder(run: Callable[[Array | None], Array], rows: Array | None, pooled_only: bool,
                 attention_mask: Array | None) -> tuple[Array | None, Array]:
    """Runs a text encoder (`run(rows)` -> final states) and pools it: at `rows`, or the mean over real tokens.

    With `pooled_only` and a row to pool at, the last layer runs for that token only and last_hidden_state is
    None; mean pooling needs every token, so it always runs the whole last layer."""
    if pooled_only and rows is not None:
        return None, run(rows)[:, 0]
    hidden = run(None)
    if rows is None:
        mask = (jnp.ones(hidden.shape[:2]) if attention_mask is None else attention_mask).astype(hidden.dtype)
        pooled = (hidden * mask[..., None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
    else:
        pooled = hidden[jnp.arange(hidden.shape[0]), rows]
    return (None if pooled_only else hidden), pooled
