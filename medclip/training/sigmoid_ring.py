"""The sigmoid (SigLIP) loss over a device mesh without the global similarity matrix: big_vision's chunked form
(Zhai et al. 2023, section 3.1), as a ring.

Each device keeps its images and passes its texts to the next device, `devices - 1` times (`ppermute` inside
`shard_map`), so it only ever holds (local texts x local images) logits: the block with the positives first,
then one block of negatives per hop. Loss and gradients equal `losses.sigmoid_loss` on the all-gathered
(global, global) logits: the sum over every (text, image) pair is the same sum, cut into blocks and added
up in another order (tests/test_sigmoid_ring.py holds them equal at 8 simulated devices).

The gradient is a second trip round the ring (a custom VJP), not the transpose of the first: differentiating
the forward loop would keep every visiting text block for the backward pass, i.e. the whole gathered text
batch on every device, which is what the ring is there to avoid (big_vision dropped its ppermute version as
"memory intensive" for that reason). On the way back each text block carries its own gradient, and one last
hop brings it home.

The text-to-image accuracy the step logs rides along: each travelling text carries its positive logit and the
largest negative logit it has met, so after the last hop every text has seen every image.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from medclip.training.mesh import DATA_AXIS

# --sigmoid_form: gathered (one (global, global) logits matrix, XLA's gathers) or ring (this module).
SIGMOID_FORMS = ("gathered", "ring")


def _raw(image: jax.Array, text: jax.Array) -> jax.Array:
    return text @ image.T


def _logits(raw: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    """(texts, images) logits of one block, formed as the model forms `logits_per_text`."""
    return (raw * scale + bias).astype(jnp.float32)


def _labels(n: int, positives: bool) -> jax.Array:
    return 2 * jnp.eye(n, dtype=jnp.float32) - 1 if positives else -jnp.ones((n, n), jnp.float32)


def _forward(axis: str, devices: int, image, text, scale, bias):
    """This device's share of the summed loss, and how many of its travelling texts rank their image first."""
    ring = [(i, (i + 1) % devices) for i in range(devices)]
    logits = _logits(_raw(image, text), scale, bias)
    n = logits.shape[0]
    loss = -jnp.sum(jax.nn.log_sigmoid(_labels(n, True) * logits))
    positive = jnp.diagonal(logits)
    hardest = jnp.max(jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, logits), axis=-1)

    def hop(carry, _):
        text, positive, hardest, loss = carry
        text, positive, hardest = jax.lax.ppermute((text, positive, hardest), axis, ring)
        logits = _logits(_raw(image, text), scale, bias)  # every pair here is a negative
        return (text, positive, jnp.maximum(hardest, logits.max(axis=-1)),
                loss - jnp.sum(jax.nn.log_sigmoid(-logits))), None

    (_, positive, hardest, loss), _ = jax.lax.scan(hop, (text, positive, hardest, loss), None, length=devices - 1)
    return loss, jnp.sum((positive > hardest).astype(jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _local(axis: str, devices: int, image, text, scale, bias):
    return _forward(axis, devices, image, text, scale, bias)


def _local_fwd(axis, devices, image, text, scale, bias):
    return _forward(axis, devices, image, text, scale, bias), (image, text, scale, bias)


def _local_bwd(axis, devices, residuals, cotangents):
    image, text, scale, bias = residuals
    g = cotangents[0]  # the count of correct texts has no gradient
    ring = [(i, (i + 1) % devices) for i in range(devices)]

    def block(text, positives):
        raw = _raw(image, text)
        labels = _labels(raw.shape[0], positives)
        d_logits = -g * labels * jax.nn.sigmoid(-labels * _logits(raw, scale, bias))  # d(-log_sigmoid(y x))/dx
        d_raw = (d_logits * scale).astype(raw.dtype)
        return (d_raw.T @ text, d_raw @ image, jnp.sum(d_logits * raw.astype(jnp.float32)), jnp.sum(d_logits))

    d_image, d_text, d_scale, d_bias = block(text, True)

    def hop(carry, _):
        text, d_text, d_image, d_scale, d_bias = carry
        text, d_text = jax.lax.ppermute((text, d_text), axis, ring)
        di, dt, ds, db = block(text, False)
        return (text, d_text + dt, d_image + di, d_scale + ds, d_bias + db), None

    (_, d_text, d_image, d_scale, d_bias), _ = jax.lax.scan(hop, (text, d_text, d_image, d_scale, d_bias), None,
                                                            length=devices - 1)
    if devices > 1:  # each text's gradient has gone round with it; one more hop brings it home
        d_text = jax.lax.ppermute(d_text, axis, ring)
    return (d_image.astype(image.dtype), d_text.astype(text.dtype), d_scale.astype(scale.dtype),
            d_bias.astype(bias.dtype))


_local.defvjp(_local_fwd, _local_bwd)


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

    def local(image, text, scale, bias):
        # scale and bias enter every device's share: made device-varying here, so their gradients (each
        # device's part) are summed over the mesh by the transpose of this cast
        scale, bias = (jax.lax.pcast(x, axis, to="varying") for x in (scale, bias))
        loss, correct = _local(axis, devices, image, text, scale, bias)
        return jax.lax.psum(loss, axis) / total, jax.lax.psum(correct, axis) / total

    bias = jnp.zeros((), jnp.float32) if bias is None else bias
    return jax.shard_map(local, mesh=mesh, in_specs=(P(axis), P(axis), P(), P()), out_specs=(P(), P()))(
        image_embeds, text_embeds, scale, bias)
