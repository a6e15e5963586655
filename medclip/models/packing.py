"""Padding-free text towers: the real tokens of a padded batch packed into one dense buffer.

Captions are short and batches are padded to `max_seq_length` (ROCO's captions, 128 tokens: mostly
padding). A padded position never reaches a real token: the attention mask hides it as a key, and every
other op is per token. So the towers' per-token work (projections, MLPs, norms: nearly all of it) runs on the
packed real tokens only, and only attention sees the padded layout. The same outputs and gradients, with
the text tower's work in proportion to the real tokens (see benchmarks/train_step.py).

Shapes must be static under `jit`, so a `PackingPlan` fixes the buffer size from the host's copy of the batch
(`plan_packing`, rounded up to one of a few sizes: at most that many compilations). Each data shard packs its
own rows (`groups`), so the gathers never cross devices.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class PackingPlan:
    """Static sizes: `groups` row blocks (the data shards), each packed into `tokens` positions."""

    groups: int
    tokens: int


def plan_packing(attention_mask: np.ndarray, groups: int = 1, sizes: int = 8) -> PackingPlan | None:
    """The plan for this batch: the fullest group's real tokens rounded up to a multiple of 1/`sizes` of a
    group's padded capacity (so at most `sizes` different plans, hence compilations). None when packing would
    save nothing (or `sizes` is 0): the padded layout then runs as before."""
    mask = np.asarray(attention_mask)
    if sizes <= 0 or mask.shape[0] % groups:
        return None
    per_group = mask.reshape(groups, -1)
    capacity = per_group.shape[1]
    step = -(-capacity // sizes)
    tokens = min(capacity, -(-int((per_group > 0).sum(axis=1).max()) // step) * step)
    return PackingPlan(groups, max(tokens, step)) if tokens < capacity else None


@struct.dataclass
class Packing:
    """Where each packed token comes from and where each padded position went, per group.

    gather  (groups, tokens): the packed tokens' positions in the group's flattened (rows x length) block;
            unused slots hold the block size, which reads a zero row.
    scatter (groups, rows x length): each padded position's packed slot; padding holds `tokens`, a zero row.
    """

    gather: Array
    scatter: Array
    overflow: Array  # (groups,) bool: more real tokens than the plan holds (outputs are then NaN, see below)
    length: int = struct.field(pytree_node=False)

    @property
    def groups(self) -> int:
        return self.gather.shape[0]

    def pack(self, x: Array) -> Array:
        """(batch, length, ...) padded -> (groups, tokens, ...) packed."""
        blocks = x.reshape(self.groups, -1, *x.shape[2:])
        return _take(_with_zero_row(blocks), self.gather)

    def unpack(self, x: Array) -> Array:
        """(groups, tokens, ...) packed -> (batch, length, ...) padded, zeros at padding."""
        padded = _take(_with_zero_row(x), self.scatter)
        return padded.reshape(-1, self.length, *x.shape[2:])

    def take(self, x: Array, positions: Array) -> Array:
        """The packed states of one token per sequence, at sequence positions `positions` (batch,):
        (batch, 1, ...). A sequence whose token is padding, or whose group overflowed, gets NaN rather than
        another token's state, so a bad plan cannot pass unnoticed."""
        rows = self.scatter.shape[1] // self.length
        blocks = positions.reshape(self.groups, rows) + jnp.arange(rows) * self.length
        slots = jnp.take_along_axis(self.scatter, blocks, axis=1)
        invalid = (slots >= x.shape[1]) | self.overflow[:, None]
        picked = _take(x, jnp.minimum(slots, x.shape[1] - 1))
        picked = jnp.where(invalid.reshape(invalid.shape + (1,) * (x.ndim - 2)), jnp.nan, picked)
        return picked.reshape(-1, 1, *x.shape[2:])


def make_packing(attention_mask: Array | None, plan: PackingPlan) -> Packing:
    """Traceable: the index maps for `attention_mask` (batch, length) under `plan`."""
    if attention_mask is None:
        raise ValueError("packing needs the attention_mask: it is what tells real tokens from padding")
    batch, length = attention_mask.shape
    real = (attention_mask > 0).reshape(plan.groups, -1)
    block = real.shape[1]
    gather = jax.vmap(lambda r: jnp.nonzero(r, size=plan.tokens, fill_value=block)[0])(real)
    slot = jnp.cumsum(real, axis=1) - 1
    scatter = jnp.where(real & (slot < plan.tokens), slot, plan.tokens)
    overflow = real.sum(axis=1) > plan.tokens
    return Packing(gather=gather.astype(jnp.int32), scatter=scatter.astype(jnp.int32), overflow=overflow,
                   length=length)


def _with_zero_row(x: Array) -> Array:
    return jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=1)


def _take(x: Array, index: Array) -> Array:
    """x[g, index[g, i]] along axis 1, batched over groups (a gather XLA keeps local to each shard)."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)
