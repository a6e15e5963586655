"""The kernels' two sets of forms (medclip.models.kernels): the plain forms that GPU and TPU get train exactly as the
CPU forms do, the CPU forms never reach a step lowered for TPU or CUDA, and the mode can be forced."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from medclip import FlaxHybridCLIP, HybridCLIPConfig
from medclip.models import BertConfig, CLIPVisionConfig, kernels
from medclip.models.kernels import cpu
from medclip.models.modified_resnet import ModifiedResNet, ModifiedResNetConfig
from medclip.models.timm_resnet import TimmResNet, TimmResNetConfig
from medclip.training.arguments import DataArguments, ModelArguments, TrainingArguments
from medclip.training.config_check import ConfigError, validate
from medclip.training.optim import OptimizerConfig, make_optimizer
from medclip.training.step import StepConfig, init_state, make_train_step

CPU_MARKERS = (cpu.SCOPE, "optimization_barrier")  # the CPU forms' named scope; their transposes' barriers


def _batch(batch: int, length: int, image_size: int, vocab: int, seed: int = 0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    mask = (np.arange(length)[None] < rng.integers(length // 2, length + 1, size=(batch, 1))).astype(np.int32)
    return {"input_ids": jnp.asarray(rng.integers(2, vocab, size=(batch, length)) * mask, jnp.int32),
            "attention_mask": jnp.asarray(mask),
            "pixel_values": jnp.asarray(rng.normal(size=(batch, image_size, image_size, 3)), jnp.float32)}


def _assert_same(a, b) -> None:
    """rtol 1e-5 per element, and an absolute 1e-5 of the largest gradient element: fp32 sums in another order
    (erf against erfc, a transposed product) move an element that is the difference of larger terms, or one
    that is zero but for rounding (a key bias's gradient)."""
    scale = max(float(np.abs(np.asarray(y)).max()) for y in jax.tree.leaves(b))
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5 * scale,
                                   err_msg=jax.tree_util.keystr(path))


def _loss_and_grads(build, loss_of, mode: str):
    """value_and_grad of `loss_of(module)` over the parameters of a freshly built module, traced in `mode`."""
    graphdef, params, stats = nnx.split(build(), nnx.Param, nnx.BatchStat)
    params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)

    def loss(params, stats):
        return loss_of(nnx.merge(graphdef, params, stats))

    with kernels.forced(mode):
        return jax.jit(jax.value_and_grad(loss))(params, stats)


def test_plain_forms_train_a_vit_bert_pair_as_the_cpu_forms_do():
    batch = _batch(4, 12, 32, 99)

    def clip_loss(model):
        logits = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"]).logits_per_text
        labels = jnp.arange(logits.shape[0])
        return (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()) / 2

    def build():
        return FlaxHybridCLIP(HybridCLIPConfig.tiny(), rngs=nnx.Rngs(0))

    cpu_loss, cpu_grads = _loss_and_grads(build, clip_loss, "cpu")
    plain_loss, plain_grads = _loss_and_grads(build, clip_loss, "plain")
    assert np.isfinite(float(cpu_loss))
    np.testing.assert_allclose(float(plain_loss), float(cpu_loss), rtol=1e-5)
    _assert_same(plain_grads, cpu_grads)


@pytest.mark.parametrize("tower, config", [(ModifiedResNet, ModifiedResNetConfig.tiny()),
                                           (TimmResNet, TimmResNetConfig.tiny())])
def test_plain_forms_train_a_conv_tower_as_the_cpu_forms_do(tower, config):
    pixels = _batch(4, 2, config.image_size, 99, seed=1)["pixel_values"]

    def loss(module):  # train mode: batch statistics, as the train step runs it
        pooled = module(pixels, train=True)[1]
        return jnp.sum(pooled * jnp.cos(jnp.arange(pooled.size).reshape(pooled.shape)))

    cpu_loss, cpu_grads = _loss_and_grads(lambda: tower(config, rngs=nnx.Rngs(0)), loss, "cpu")
    plain_loss, plain_grads = _loss_and_grads(lambda: tower(config, rngs=nnx.Rngs(0)), loss, "plain")
    np.testing.assert_allclose(float(plain_loss), float(cpu_loss), rtol=1e-5)
    _assert_same(plain_grads, cpu_grads)


def exported_train_step(config: HybridCLIPConfig, platforms: list[str], batch: int = 2, length: int = 8,
                        dtype=jnp.bfloat16) -> str:
    """The real training step of `config` (bf16 compute, fp32 parameters) exported for `platforms`, as MLIR text.
    Abstract throughout: no parameter is allocated, so a base-size model costs tracing time only."""
    model = nnx.eval_shape(lambda: FlaxHybridCLIP(config, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
    tx, _ = make_optimizer(params, OptimizerConfig(learning_rate=1e-4, total_steps=10))
    state = jax.eval_shape(lambda p, s: init_state(p, tx, 0, batch_stats=s), params, stats)
    size = config.vision_config.image_size
    abstract_batch = {"input_ids": jax.ShapeDtypeStruct((batch, length), jnp.int32),
                      "attention_mask": jax.ShapeDtypeStruct((batch, length), jnp.int32),
                      "pixel_values": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)}
    step = jax.jit(make_train_step(graphdef, tx, StepConfig()))
    return jax.export.export(step, platforms=platforms)(state, abstract_batch).mlir_module()


TOWERS = {"vit-bert": lambda: HybridCLIPConfig.tiny(),
          "modified_resnet-bert": lambda: HybridCLIPConfig.tiny().replace(
              vision_config=ModifiedResNetConfig.tiny()),
          "timm_resnet-bert": lambda: HybridCLIPConfig.tiny().replace(vision_config=TimmResNetConfig.tiny())}


@pytest.mark.parametrize("name", sorted(TOWERS))
def test_step_exported_for_tpu_and_cuda_holds_no_cpu_form(name):
    """Every layer type (dense, attention, GELU, 1x1 and kxk convolutions, attention pool) in the real step."""
    config = TOWERS[name]()
    text = exported_train_step(config, ["tpu", "cuda"])  # one module, each platform's branches in it
    assert not [m for m in CPU_MARKERS if m in text]
    text = exported_train_step(config, ["cpu"])  # the markers do mark the CPU forms
    assert all(m in text for m in CPU_MARKERS)


def test_base_size_bf16_step_exported_for_tpu_and_cuda_holds_no_cpu_form():
    """ViT-B/16 + BERT-base, batch 256, bf16 compute: abstract shapes only (about 12 CPU seconds to trace)."""
    config = HybridCLIPConfig(CLIPVisionConfig(patch_size=16), BertConfig(), projection_dim=512)
    text = exported_train_step(config, ["tpu", "cuda"], batch=256, length=77)
    assert "tensor<256x224x224x3xf32>" in text and "bf16" in text  # the full-size bf16 step was exported
    assert not [m for m in CPU_MARKERS if m in text]


def test_forced_mode_overrides_the_environment(monkeypatch):
    def lowered(platform: str) -> str:
        def f(x, w):
            return jnp.sum(kernels.gelu(kernels.dense(x, w)))
        return jax.jit(jax.grad(f, argnums=1)).trace(jnp.ones((4, 3)), jnp.ones((3, 5))).lower(
            lowering_platforms=(platform,)).as_text(debug_info=True)

    monkeypatch.setenv(kernels.ENV, "cpu")
    assert cpu.SCOPE in lowered("tpu")  # forced to the CPU forms on any platform
    with kernels.forced("auto"):
        assert cpu.SCOPE not in lowered("tpu") and cpu.SCOPE in lowered("cpu")
    monkeypatch.setenv(kernels.ENV, "plain")
    assert cpu.SCOPE not in lowered("cpu")
    with kernels.forced("cpu"):
        assert kernels.mode() == "cpu"
    monkeypatch.setenv(kernels.ENV, "fast")
    with pytest.raises(kernels.KernelModeError, match="MEDCLIP_KERNELS must be one of auto, cpu, plain, not 'fast'"):
        kernels.mode()
    with pytest.raises(kernels.KernelModeError):
        with kernels.forced("gpu"):
            pass


def test_a_bad_kernel_mode_is_a_configuration_error(monkeypatch, tmp_path):
    """MEDCLIP_KERNELS (medclip.models.kernels) is checked with the flags, before the model is built."""
    monkeypatch.setenv("MEDCLIP_KERNELS", "fast")
    with pytest.raises(ConfigError, match="^MEDCLIP_KERNELS must be one of auto, cpu, plain, not 'fast'$"):
        validate(ModelArguments(model_preset="demo"), DataArguments(),
                 TrainingArguments(output_dir=str(tmp_path), do_train=True))
