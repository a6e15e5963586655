"""The sigmoid (SigLIP) loss over a device mesh without the global similarity matrix: big_vision's chunked form
(Zhai et al. 2023, section 3.1), as a ring.

Each device keeps its images and passes its texts to the next device, `devices - 1` times (`ppermute` inside
`shard_map`), so it only ever holds (local images x local texts) logits: the block with the positives first,
then one block of negatives per hop. Loss and gradients equal `losses.sigmoid_loss` on the all-gathered
(global, global) logits: the sum over every (text, image) pair is the same sum, cut into blocks and added
up in another order (tests/test_sigmoid_ring.py holds them equal at 8 simulated devices).

The text-to-image accuracy the step logs rides along: each travelling text carries its positive logit and the
largest negative logit it has met, so after the last hop every text has seen every image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from medclip.training.mesh import DATA_AXIS

# --sigmoid_form: gathered (one (global, global) logits matrix, XLA's gathers) or ring (this module).
SIGMOID_FORMS = ("gathered", "ring")


def _block_logits(image: jax.Array, text: jax.Array, scale: jax.Array, bias: jax.Array | None) -> jax.Array:
    """(texts, images) logits of one block, formed exactly as the model forms `logits_per_text`."""
    logits = text @ image.T * scale
    if bias is not None:
        logits = logits + bias
    return logits.astype(jnp.float32)


def sigmoid_loss_ring(image_embeds: jax.Array, text_embeds: jax.Array, scale: jax.Array, bias: jax.Array | None,
                      mesh: Mesh, axis: str = DATA_AXIS) -> tuple[jax.Array, jax.Array]:
    """(global image embeds, global text embeds, logit scale, logit bias or None) -> (loss, t2i accuracy).

    The embeddings are (global batch, dim) arrays split on `axis` of `mesh`; the loss is
    -sum(log_sigmoid(label * logit)) / global batch, as `losses.sigmoid_loss`. The accuracy is the share of
    texts whose own image has a larger logit than every other image (the step's `in_batch_t2i_acc`; argmax
    ties, a measure-zero event in floating point, count as misses here).
    """
    devices = mesh.shape[axis]
    total = image_embeds.shape[0]
    if total % devices:
        raise ValueError(f"the sigmoid ring splits the batch over {devices} devices; {total} is not a multiple")
    ring = [(i, (i + 1) % devices) for i in range(devices)]
    has_bias = bias is not None

    def local(image, text, scale, bias):
        bias = bias if has_bias else None
        logits = _block_logits(image, text, scale, bias)
        n = logits.shape[0]
        labels = 2 * jnp.eye(n, dtype=jnp.float32) - 1  # the positives are on this block's diagonal
        loss = -jnp.sum(jax.nn.log_sigmoid(labels * logits))
        positive = jnp.diagonal(logits)
        hardest = jnp.max(jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, logits), axis=-1)

        def hop(carry, _):
            text, positive, hardest, loss = carry
            text, positive, hardest = jax.lax.ppermute((text, positive, hardest), axis, ring)
            logits = _block_logits(image, text, scale, bias)  # every pair here is a negative
            loss = loss - jnp.sum(jax.nn.log_sigmoid(-logits))
            return (text, positive, jnp.maximum(hardest, logits.max(axis=-1)), loss), None

        (_, positive, hardest, loss), _ = jax.lax.scan(hop, (text, positive, hardest, loss), None,
                                                        length=devices - 1)
        correct = jnp.sum((positive > hardest).astype(jnp.float32))
        return jax.lax.psum(loss, axis) / total, jax.lax.psum(correct, axis) / total

    bias_in = bias if has_bias else jnp.zeros((), jnp.float32)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(axis), P(axis), P(), P()), out_specs=(P(), P()))(
        image_embeds, text_embeds, scale, bias_in)
