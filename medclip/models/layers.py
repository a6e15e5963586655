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

from medclip.models.packing import Packing

Array = jax.Array


def _quick_gelu(x: Array) -> Array:
    return x * jax.nn.sigmoid(1.702 * x)


def _gelu(x: Array) -> Array:
    """Exact GELU in PyTorch's form, 0.5 x (1 + erf(x / sqrt 2)).

    `jax.nn.gelu(approximate=False)` computes the same function through erfc, whose XLA:CPU expansion is
    2.6x slower (forward of a 4096x1024 block: 6.5 ms against 2.5 ms; a tiny-config training step 3.5% faster).
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * 0.7071067811865476))


# Names as Hugging Face configs spell them (`hidden_act` / DistilBERT's `activation`).
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": _gelu,
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


def _weight_grad(x: Array, dy: Array) -> Array:
    """x^T dy for x (tokens, in) and dy (tokens, out): a dense layer's kernel gradient.

    XLA:CPU hands a dot to YNNPACK only if its lhs contracts the minor dimension; x^T dy contracts the token
    dimension of both operands, so XLA runs it on its Eigen fallback at half speed (one core, 4096 tokens,
    256 -> 1024: 45 against 83 GFLOP/s; 2048 tokens, 768 -> 3072: 46 against 91). Transposing the narrower
    operand first keeps the dot on YNNPACK; `optimization_barrier` stops XLA folding the transpose back into
    the dot (and, on the dy side, the transpose of the result). Other backends take x^T dy as it is.
    """
    if jax.default_backend() != "cpu":
        return x.T @ dy
    barrier = jax.lax.optimization_barrier
    if x.shape[1] <= dy.shape[1]:
        return barrier(x.T) @ dy
    return barrier(barrier(dy.T) @ x).T


@jax.custom_vjp
def dense(x: Array, kernel: Array, bias: Array | None = None) -> Array:
    """x @ kernel (+ bias) over the last axis of x, with a kernel gradient that runs at full speed on CPU."""
    y = x @ kernel
    return y if bias is None else y + bias


def _dense_fwd(x, kernel, bias):
    return dense(x, kernel, bias), (x, kernel, bias is None)


def _dense_bwd(residuals, dy):
    x, kernel, no_bias = residuals
    x2d, dy2d = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    bias_grad = None if no_bias else dy2d.sum(axis=0)
    return dy @ kernel.T, _weight_grad(x2d, dy2d), bias_grad


dense.defvjp(_dense_fwd, _dense_bwd)


def linear(layer: nnx.Linear, x: Array) -> Array:
    """Applies an `nnx.Linear` through `dense`; the module keeps its parameters (and checkpoint names)."""
    dtype = layer.dtype or x.dtype
    bias = layer.bias[...].astype(dtype) if layer.bias is not None else None
    return dense(x.astype(dtype), layer.kernel[...].astype(dtype), bias)


@jax.custom_vjp
def attention(q: Array, k: Array, v: Array, bias: Array | None) -> Array:
    """softmax(q k^T + bias) v for q, k, v (batch, heads, length, head_dim); q comes pre-scaled.

    Scores and softmax are fp32 whatever the compute dtype. The hand-written backward keeps only the
    probabilities and the output, and gets softmax's row term from rowsum(dO * O) (d wide) rather than
    rowsum(dP * P) (length wide), as FlashAttention does: one-core training step 1.3% (tiny) and 1.8%
    (small, 128 tokens) faster than autodiff through the same einsums.
    """
    return _attention_fwd(q, k, v, bias)[0]


def _attention_probs(q: Array, k: Array, bias: Array | None) -> Array:
    """softmax(q k^T + bias) in fp32, (batch, heads, q, k)."""
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    return jax.nn.softmax(scores if bias is None else scores + bias, axis=-1)


def _attention_fwd(q, k, v, bias):
    probs = _attention_probs(q, k, bias)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v)
    return out, (q, k, v, probs, out)


def _attention_bwd(residuals, d_out):
    q, k, v, probs, out = residuals
    d_probs = jnp.einsum("bhqd,bhkd->bhqk", d_out, v, preferred_element_type=jnp.float32)
    d_v = _keys_grad(probs.astype(d_out.dtype), d_out)
    row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    d_scores = (probs * (d_probs - row)).astype(q.dtype)
    d_q = jnp.einsum("bhqk,bhkd->bhqd", d_scores, k)
    d_k = _keys_grad(d_scores, q)
    return d_q, d_k, d_v, None  # the bias comes from the padding mask: no gradient


def _keys_grad(a: Array, b: Array) -> Array:
    """a^T b per head for a (batch, heads, q, k) and b (batch, heads, q, d): the gradients of k and v.

    Like `_weight_grad`: this contracts the query axis, which is not a's minor one, so XLA:CPU would run it
    on its Eigen fallback (about 20 GFLOP/s per core at 65 tokens). A materialised a^T (64 KB per head at 128
    tokens) puts it on YNNPACK: a tiny-config training step 1.4-3.3% faster (three interleaved A/B runs).
    """
    if jax.default_backend() != "cpu":
        return jnp.einsum("bhqk,bhqd->bhkd", a, b)
    a_t = jax.lax.optimization_barrier(jnp.swapaxes(a, -1, -2))
    return jnp.einsum("bhkq,bhqd->bhkd", a_t, b)


attention.defvjp(_attention_fwd, _attention_bwd)


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
            context = attention(q, k, v, bias)
        else:  # dropout on the probabilities: plain autodiff
            probs = dropout(_attention_probs(q, k, bias), self.dropout_rate, rng)
            context = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v)
        batch, _, queries, _ = q.shape
        context = context.transpose(0, 2, 1, 3).reshape(batch, queries, -1)
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
        return dense(x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype))

    def _heads(self, projected: Array) -> list[Array]:
        """(batch, length, n * hidden) -> n arrays (batch, heads, length, head_dim)."""
        batch, length, width = projected.shape
        n = width // (self.num_heads * self.head_dim)
        return list(projected.reshape(batch, length, n, self.num_heads, self.head_dim).transpose(2, 0, 3, 1, 4))


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

    Unrolled layers measured faster than `lax.scan` on CPU (../shared/PERF_NOTES.md); remat trades
    compute for activation memory on large towers.
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
