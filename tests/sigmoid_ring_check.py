"""Run with 8 simulated CPU devices (XLA_FLAGS set by the caller): the ring sigmoid loss against the all-gathered
one, as a function of the embeddings and inside the train step of a tiny SigLIP (ring on 8 devices against the
gathered form on 1); prints JSON with the largest differences."""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from tests.sharded_step_check import _diffs, run
from medclip.models.hybrid import HybridCLIPConfig
from medclip.models.siglip_text import SiglipTextConfig
from medclip.models.siglip_vision import SiglipVisionConfig
from medclip.training import mesh as mesh_lib
from medclip.training.losses import LossConfig, sigmoid_loss
from medclip.training.sigmoid_ring import sigmoid_loss_ring
from medclip.training.step import StepConfig


def _gathered(image, text, scale, bias):
    logits = text @ image.T * scale
    logits = logits if bias is None else logits + bias
    return sigmoid_loss(logits), jnp.mean(jnp.argmax(logits, axis=-1) == jnp.arange(logits.shape[0]))


def loss_function_diffs(with_bias: bool) -> dict[str, float]:
    """Loss, t2i accuracy and the gradients in every input, ring on the 8-device mesh against the gathered form."""
    rng = np.random.default_rng(1)
    image, text = (rng.normal(size=(32, 16)).astype(np.float32) for _ in range(2))
    text[:12] += 2 * image[:12]  # some texts find their image, so the accuracy is neither 0 nor 1
    image, text = (x / np.linalg.norm(x, axis=-1, keepdims=True) for x in (image, text))
    scale, bias = jnp.float32(9.5), (jnp.float32(-3.25) if with_bias else None)
    mesh = mesh_lib.make_mesh()
    sharded = [jax.device_put(x, mesh_lib.batch_sharding(mesh)) for x in (image, text)]
    args = (0, 1, 2, 3) if with_bias else (0, 1, 2)

    def ring(*a):
        return sigmoid_loss_ring(*a[:3], a[3] if with_bias else None, mesh)

    def gathered(*a):
        return _gathered(*a[:3], a[3] if with_bias else None)

    inputs = [*sharded, scale] + ([bias] if with_bias else [])
    (ring_loss, ring_acc), ring_grads = jax.jit(jax.value_and_grad(ring, argnums=args, has_aux=True))(*inputs)
    (loss, acc), grads = jax.value_and_grad(gathered, argnums=args, has_aux=True)(image, text, scale,
                                                                                   *([bias] if with_bias else []))
    return {"loss": float(loss), "loss_diff": abs(float(ring_loss) - float(loss)),
            "accuracy": float(acc), "accuracy_diff": abs(float(ring_acc) - float(acc)),
            "grad_diff": max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(ring_grads, grads)),
            "grad_max": max(float(jnp.max(jnp.abs(b))) for b in grads)}


def tiny_siglip() -> HybridCLIPConfig:
    """A SiglipModel of tiny towers (32 px, 16 tokens), with SigLIP's unclamped scale and a non-default bias."""
    return HybridCLIPConfig.from_dict({
        "model_type": "siglip", "vision_config": SiglipVisionConfig.tiny().to_hf_dict(),
        "text_config": SiglipTextConfig.tiny().to_hf_dict(), "logit_scale_init_value": 2.5,
        "logit_bias_init_value": -2.0})


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    report = {"bias": loss_function_diffs(True), "no_bias": loss_function_diffs(False)}
    rng = np.random.default_rng(0)
    batches = [{"input_ids": rng.integers(2, 90, size=(16, 12)).astype(np.int32),
                "attention_mask": np.ones((16, 12), np.int32),
                "pixel_values": rng.normal(size=(16, 32, 32, 3)).astype(np.float32)} for _ in range(2)]
    config = tiny_siglip()
    gathered = StepConfig(loss=LossConfig(name="sigmoid"))
    ring = StepConfig(loss=LossConfig(name="sigmoid", sigmoid_form="ring"))
    one = run(jax.devices()[:1], False, batches, config=config, step_config=gathered)
    report["step"] = _diffs(one, run(jax.devices(), False, batches, config=config, step_config=ring))
    report["losses"], report["grad_norms"] = one[0], one[1]
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
