"""Benchmark: one training step of the dual encoder, ours (JAX) against a PyTorch implementation of the same model,
on the same batch and the same weights: transformers' `VisionTextDualEncoderModel` (ViT + BERT; in this process)
and open_clip's `CustomTextCLIP` (ModifiedResNet + BERT, PMC-CLIP's architecture; in a worker process).

    .venv/bin/python benchmarks/train_step.py                        # tiny, small, base on this machine's CPU
    .venv/bin/python benchmarks/train_step.py --configs tiny --windows 9 --steps 4
    .venv/bin/python benchmarks/train_step.py --configs rn50 --windows 5   # against open_clip (needs .venv-ref)
    .venv/bin/python benchmarks/train_step.py --cores 1              # one core each: least sensitive to noise
    .venv/bin/python benchmarks/train_step.py --device gpu --configs vitb16,rn50-b256   # what a GPU user compares

On a GPU (`--device gpu`): bf16 compute (`--dtype auto`; ours: bf16 activations, fp32 parameters and optimizer, as
`--dtype auto` trains) against PyTorch under `torch.autocast(bfloat16)` eager and `torch.compile`d
(`--torch-modes`, default eager,compile on GPU), batch 256 (`vitb16`: ViT-B/16 + BERT-base against
transformers; `rn50-b256`: RN50 + BERT-base against open_clip), pairs/s, MFU against the measured bf16 matmul
peak, and peak memory: ours from XLA's memory analysis of the compiled step (arguments + outputs + temporaries,
less what is donated) and `device.memory_stats()["peak_bytes_in_use"]` (the process's peak so far), PyTorch's
`torch.cuda.max_memory_allocated()` over its timed steps. JAX does not preallocate here
(XLA_PYTHON_CLIENT_PREALLOCATE=false, XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 unless set), so PyTorch in the same
process and the open_clip workers find room on the device; at batch 256 an 80 GB GPU holds them, a smaller one
needs `--batch`.

What runs
  ours     the real step: `medclip.training.step.make_train_step` (forward, symmetric InfoNCE, backward,
           global-norm clipping, AdamW with weight decay from `medclip.training.optim.make_optimizer`,
           non-finite skipping), jitted with the state donated; BatchNorm (rn50) in train mode, its running
           statistics in the state's `batch_stats` as the trainer keeps them.
  PyTorch  the same step: forward to the same symmetric InfoNCE (transformers' `return_loss=True`, open_clip's
           `ClipLoss`), backward, `clip_grad_norm_(1.0)`, AdamW (fused) with the same decay mask (checked: both
           sides' parameter and decayed element counts must agree) and a linear schedule.
  Both fp32 on CPU (bf16 on GPU, above), dropout 0 (set in the configs); the PyTorch weights are loaded into
  ours through the real checkpoint loader, so the first losses must agree (printed as a check; bf16 agrees to
  about 1e-2, fp32 to 1e-4).

The rn50 configs' peer runs in benchmarks/openclip_step_worker.py, a persistent subprocess of the reference
venv's Python (`--ref-python`, default .venv-ref/bin/python, built by `make .venv-ref/.ref`, the venv of `make
golden`): open_clip needs torchvision, which does not load against the main venv's torch. The worker builds
the model (seeded random weights), writes it as an OpenCLIP folder (open_clip_config.json +
open_clip_model.safetensors) that ours loads, reads the batch from .npy files (pixels NCHW; ours gets NHWC)
and, asked for n steps in one message, runs and times them itself, the way ours is timed in this process
(`InProcessStep.run`: wall and process CPU seconds), so the pipe is in neither measurement. It uses as many
threads as this process may use cores (it inherits `--cores`' affinity mask) and the same glibc settings (see
Host memory). `--no-torch` times ours alone without the reference venv.

Configs (README's training-step rows quote tiny, small, base and rn50 from benchmarks/results/train_step-cpu-*.md).
Heads are 64 wide, MLPs 4x hidden:
  tiny       ViT 4 x 256 (128 px, patch 16: 65 tokens) + BERT 4 x 256 (64 tokens, vocab 30522), proj 256, batch 64
  small      ViT 6 x 512 (224 px, patch 32: 50 tokens) + BERT 6 x 512 (128 tokens), proj 512, batch 32
  base       ViT-B/32 (224 px) + BERT-base (128 tokens), proj 512, batch 16
  rn50       PMC-CLIP's RN50_fusion4 without the fusion module: OpenAI's RN50 ModifiedResNet (layers 3, 4, 6, 3,
             width 64, attention pool 2048 wide with 32 heads, 224 px) + BERT-base (12 x 768, vocab 30522, 77
             tokens, PMC-CLIP's context length), text feature the [CLS] hidden state through a linear projection
             without bias (open_clip's cls_last_hidden_state_pooler + hf_proj_type linear: PMC-CLIP's
             `hidden[:, 0] @ text_projection`), embed 768 (PMC-CLIP's; OpenAI RN50's is 1024), batch 16
  rn50-tiny  the same at toy sizes, to develop and smoke-test: layers 1, 1, 1, 1, width 8 (pool 256 wide,
             4 heads), 64 px + BERT 2 x 128 (32 tokens), embed 64, batch 8
  vitb16     GPU: ViT-B/16 (224 px, 197 tokens) + BERT-base (77 tokens), proj 512, batch 256
  rn50-b256  GPU: rn50 at batch 256

Timing: both are compiled/warmed up first (`--warmup` steps each); then `--windows` windows, in each of which
both implementations run `--steps` steps back to back, in alternating order, so machine noise hits both
alike. Pairs/s is the median over windows; CPU s/step (process CPU time, all threads) is printed too: it is
much less sensitive to other load on the machine than wall time. Shared machines are noisy: the load
average is recorded, and `--cores 1` compares single-core work.

Same result, less work, as our trainer runs it: (1) the loss reads one token per sequence from each tower
(CLS, or CLIP text's end token), so the towers' last layers run for that token only (keys and values still
from every token); (2) the text tower runs on the real tokens only, packed (`medclip.models.packing`; the
batch has ragged captions, a quarter of its positions padding), attention alone on the padded layout. Same
loss and gradients (first losses printed). `--same-work` turns both off: ours then does exactly PyTorch's
work, the like-for-like comparison of the two implementations' kernels. (The ModifiedResNet's attention pool
always computes its one read query only, `--same-work` or not; open_clip computes all 50 and keeps one.)

FLOPs and MFU: MFU uses model FLOPs, an analytic matmul (and convolution) count of the full model (what
PyTorch runs), for both implementations, so it compares pairs/s on one scale. Our executed FLOPs come from
XLA's cost analysis of the compiled step (layers are unrolled, so it counts every layer), cross-checked against
the analytic count of what our step computes (the analytic count is used if they differ by more than 10%);
"ours executed GFLOP/s" is the rate our hardware work ran at. MFU divides by a matmul peak in the compute dtype
measured in this run (2048^3 on CPU, 8192^3 on GPU; the best of JAX and torch, measured before every config,
highest value kept). For rn50 the count is convolutions and matmuls: 3x the forward, the first convolution 2x
(no input gradient); BatchNorm, pooling and the elementwise work are left out.

Host memory: like run_hybrid_clip.py, this calls `medclip.training.host_memory.keep_host_memory_mapped`
before JAX starts (glibc keeps XLA's per-step scratch memory mapped instead of page-faulting it in every
step). It applies to the whole process, the in-process PyTorch included, and the open_clip worker applies it
to itself; MEDCLIP_KEEP_HOST_MEMORY=0 turns it off for both.

Results: a table on stdout and benchmarks/results/train_step-<device>-<time>.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WORKER = Path(__file__).resolve().parent / "openclip_step_worker.py"
TOTAL_STEPS = 10_000  # the linear schedule's length (both sides): the learning rate barely moves in a run


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """ViT + BERT, transformers' VisionTextDualEncoderModel as the peer."""

    name: str
    batch: int
    image_size: int
    patch_size: int
    vision_layers: int
    vision_hidden: int
    text_layers: int
    text_hidden: int
    text_length: int
    projection_dim: int
    vocab_size: int = 30522
    steps_per_window: int = 1  # on CPU; ten times as many on GPU

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def model_flops(self) -> float:
        return analytic_flops(self)

    def our_flops(self, same_work: bool, text_tokens: int | None) -> float:
        return analytic_flops(self, pooled_only=not same_work, text_tokens=text_tokens)


@dataclasses.dataclass(frozen=True)
class ResNetBenchConfig:
    """OpenAI's ModifiedResNet + a Hugging Face BERT ([CLS] hidden state, linear projection without bias) as
    open_clip's CustomTextCLIP builds them, open_clip as the peer: PMC-CLIP's RN50_fusion4 without fusion."""

    name: str
    batch: int
    image_size: int
    resnet_layers: tuple[int, int, int, int]
    resnet_width: int
    text_layers: int
    text_hidden: int
    text_length: int
    projection_dim: int
    vocab_size: int = 30522
    steps_per_window: int = 1  # on CPU; ten times as many on GPU

    def bert_config(self) -> dict[str, Any]:
        """A transformers config.json: open_clip's HF text tower and our loader both read it from a folder."""
        return {"model_type": "bert", "architectures": ["BertModel"], "vocab_size": self.vocab_size,
                "hidden_size": self.text_hidden, "num_hidden_layers": self.text_layers,
                "num_attention_heads": self.text_hidden // 64, "intermediate_size": 4 * self.text_hidden,
                "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
                "max_position_embeddings": 512, "type_vocab_size": 2, "initializer_range": 0.02,
                "layer_norm_eps": 1e-12, "pad_token_id": 0}

    def open_clip_model_cfg(self, bert_folder: Path) -> dict[str, Any]:
        return {"embed_dim": self.projection_dim,
                "vision_cfg": {"image_size": self.image_size, "layers": list(self.resnet_layers),
                               "width": self.resnet_width, "head_width": 64},
                "text_cfg": {"hf_model_name": str(bert_folder), "hf_model_pretrained": False,
                             "hf_proj_type": "linear", "hf_pooler_type": "cls_last_hidden_state_pooler",
                             "context_length": self.text_length}}

    def model_flops(self) -> float:
        return resnet_clip_flops(self, pool_query_only=False, pooled_only=False)

    def our_flops(self, same_work: bool, text_tokens: int | None) -> float:
        return resnet_clip_flops(self, pool_query_only=True, pooled_only=not same_work, text_tokens=text_tokens)


CONFIGS: dict[str, BenchConfig | ResNetBenchConfig] = {
    "tiny": BenchConfig("tiny", batch=64, image_size=128, patch_size=16, vision_layers=4, vision_hidden=256,
                        text_layers=4, text_hidden=256, text_length=64, projection_dim=256, steps_per_window=3),
    "small": BenchConfig("small", batch=32, image_size=224, patch_size=32, vision_layers=6, vision_hidden=512,
                         text_layers=6, text_hidden=512, text_length=128, projection_dim=512, steps_per_window=1),
    "base": BenchConfig("base", batch=16, image_size=224, patch_size=32, vision_layers=12, vision_hidden=768,
                        text_layers=12, text_hidden=768, text_length=128, projection_dim=512, steps_per_window=1),
    "rn50": ResNetBenchConfig("rn50", batch=16, image_size=224, resnet_layers=(3, 4, 6, 3), resnet_width=64,
                              text_layers=12, text_hidden=768, text_length=77, projection_dim=768),
    "rn50-tiny": ResNetBenchConfig("rn50-tiny", batch=8, image_size=64, resnet_layers=(1, 1, 1, 1), resnet_width=8,
                                   text_layers=2, text_hidden=128, text_length=32, projection_dim=64,
                                   steps_per_window=3),
    "vitb16": BenchConfig("vitb16", batch=256, image_size=224, patch_size=16, vision_layers=12, vision_hidden=768,
                          text_layers=12, text_hidden=768, text_length=77, projection_dim=512),
    "rn50-b256": ResNetBenchConfig("rn50-b256", batch=256, image_size=224, resnet_layers=(3, 4, 6, 3),
                                   resnet_width=64, text_layers=12, text_hidden=768, text_length=77,
                                   projection_dim=768),
}


# ---------------------------------------------------------------------------------------------------------
# FLOPs and peak
def encoder_flops(batch: int, tokens: int, length: int, hidden: int, layers: int, pooled_only: bool) -> float:
    """Forward matmul FLOPs of a transformer encoder (MLP 4x hidden) on `tokens` tokens of `batch` sequences of
    `length`; `pooled_only`: the last layer for the pooled token only (its keys and values still for every
    token)."""
    def layer(queries: int, query_tokens: int) -> float:  # k, v from every token; q, out, MLP per query
        dense = 2 * tokens * 2 * hidden * hidden + 2 * query_tokens * (2 + 8) * hidden * hidden
        return dense + 2 * 2 * batch * queries * length * hidden  # scores and context

    last = layer(1, batch) if pooled_only else layer(length, tokens)
    return (layers - 1) * layer(length, tokens) + last


def analytic_flops(cfg: BenchConfig, pooled_only: bool = False, text_tokens: int | None = None) -> float:
    """Matmul FLOPs of one training step: 3x the forward (forward, input gradient, weight gradient), except
    the patch embedding, which needs no input gradient. Elementwise work, softmax, norms and the optimizer
    are left out (a few percent). Defaults: the full model, as PyTorch runs it. `pooled_only`: each tower's
    last layer for the pooled token only (its keys and values still for every token); `text_tokens`: the
    text tower's per-token work on that many (packed) tokens, attention still on the padded layout."""
    b = cfg.batch
    vision = encoder_flops(b, b * (cfg.patches + 1), cfg.patches + 1, cfg.vision_hidden, cfg.vision_layers,
                           pooled_only)
    text = encoder_flops(b, text_tokens or b * cfg.text_length, cfg.text_length, cfg.text_hidden, cfg.text_layers,
                         pooled_only)
    heads = 2 * b * (cfg.text_hidden * cfg.text_hidden  # BERT pooler
                     + (cfg.vision_hidden + cfg.text_hidden) * cfg.projection_dim) + 2 * b * b * cfg.projection_dim
    patch_embed = 2 * b * cfg.patches * 3 * cfg.patch_size ** 2 * cfg.vision_hidden
    return 3 * (vision + text + heads) + 2 * patch_embed


def conv_flops(batch: int, size: int, channels_in: int, channels_out: int, kernel: int) -> float:
    """A stride-1, same-padded convolution's FLOPs at output size x size."""
    return 2 * batch * size * size * channels_in * channels_out * kernel * kernel


def modified_resnet_flops(cfg: ResNetBenchConfig, pool_query_only: bool) -> tuple[float, float]:
    """(forward FLOPs of OpenAI's ModifiedResNet, of which its first convolution's). Strided blocks average-pool
    after the 3x3 convolution (and before the downsample projection), so conv3 and the projection run at the
    output size. `pool_query_only`: the attention pool computes the one query it returns (ours); open_clip
    runs all of them and keeps the first."""
    b, w = cfg.batch, cfg.resnet_width
    size = cfg.image_size // 2
    first = conv_flops(b, size, 3, w // 2, 3)
    total = first + conv_flops(b, size, w // 2, w // 2, 3) + conv_flops(b, size, w // 2, w, 3)
    size, inplanes = size // 2, w
    for stage, blocks in enumerate(cfg.resnet_layers):
        planes = w * 2 ** stage
        for i in range(blocks):
            out_size = size // 2 if stage > 0 and i == 0 else size
            total += (conv_flops(b, size, inplanes, planes, 1) + conv_flops(b, size, planes, planes, 3)
                      + conv_flops(b, out_size, planes, 4 * planes, 1))
            if i == 0:  # inplanes != 4 * planes or strided: the downsample projection
                total += conv_flops(b, out_size, inplanes, 4 * planes, 1)
            size, inplanes = out_size, 4 * planes
    tokens, width = size * size + 1, 32 * w
    queries = 1 if pool_query_only else tokens
    total += 2 * b * (2 * tokens + queries) * width * width  # k, v for every token; q for each query
    total += 2 * 2 * b * queries * tokens * width  # scores and context
    total += 2 * b * queries * width * cfg.projection_dim  # c_proj
    return total, first


def resnet_clip_flops(cfg: ResNetBenchConfig, pool_query_only: bool, pooled_only: bool,
                      text_tokens: int | None = None) -> float:
    """Convolution and matmul FLOPs of one training step: 3x the forward, the first convolution 2x (no input
    gradient); BatchNorm, pooling, elementwise work and the optimizer are left out. `pooled_only` and
    `text_tokens` as in analytic_flops, for the text tower (no BERT pooler: the [CLS] hidden state is read)."""
    b = cfg.batch
    vision, first_conv = modified_resnet_flops(cfg, pool_query_only)
    text = encoder_flops(b, text_tokens or b * cfg.text_length, cfg.text_length, cfg.text_hidden, cfg.text_layers,
                         pooled_only)
    heads = 2 * b * cfg.text_hidden * cfg.projection_dim + 2 * b * b * cfg.projection_dim
    return 3 * (vision - first_conv + text + heads) + 2 * first_conv


def xla_flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def best_seconds(run, sync, repeats: int) -> float:
    """Fastest of `repeats` timed calls of sync(run()), after one untimed call (warm-up, compilation)."""
    sync(run())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sync(run())
        times.append(time.perf_counter() - t)
    return min(times)


def matmul_peak(jax_device, torch_device: str | None, dtype: str = "float32", repeats: int = 10
                ) -> dict[str, float]:
    """Matmul FLOP/s in `dtype` of JAX (and torch) on this device: the yardstick for MFU."""
    import jax

    n = 2048 if jax_device.platform == "cpu" else 8192
    a, b = (jax.device_put(jax.random.normal(jax.random.PRNGKey(i), (n, n), dtype), jax_device) for i in range(2))
    matmul = jax.jit(lambda x, y: x @ y)
    peaks = {"jax": 2 * n ** 3 / best_seconds(lambda: matmul(a, b), jax.block_until_ready, repeats)}
    if torch_device:
        import torch

        ta, tb = (torch.randn(n, n, device=torch_device, dtype=getattr(torch, dtype)) for _ in range(2))
        sync = (lambda _: torch.cuda.synchronize()) if torch_device == "cuda" else (lambda _: None)
        peaks["torch"] = 2 * n ** 3 / best_seconds(lambda: ta @ tb, sync, repeats)
    return peaks


# ---------------------------------------------------------------------------------------------------------
# The two implementations
def make_batch(cfg: BenchConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens with ragged padding (lengths from half to full), normal pixels in NHWC."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, cfg.vocab_size, size=(cfg.batch, cfg.text_length))
    lengths = rng.integers(cfg.text_length // 2, cfg.text_length + 1, size=cfg.batch)
    mask = (np.arange(cfg.text_length)[None] < lengths[:, None]).astype(np.int32)
    ids[:, 0] = 101
    ids = np.where(mask == 1, ids, 0).astype(np.int32)
    pixels = rng.normal(size=(cfg.batch, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def build_torch_model(cfg: BenchConfig):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    vision = tf.CLIPVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=4 * cfg.vision_hidden,
                                 num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_hidden // 64,
                                 image_size=cfg.image_size, patch_size=cfg.patch_size)
    text = tf.BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.text_hidden,
                         intermediate_size=4 * cfg.text_hidden, num_hidden_layers=cfg.text_layers,
                         num_attention_heads=cfg.text_hidden // 64, max_position_embeddings=512,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config = tf.VisionTextDualEncoderConfig.from_vision_text_configs(vision, text, projection_dim=cfg.projection_dim)
    return tf.VisionTextDualEncoderModel(config)


def full_last_layer_class():
    """FlaxHybridCLIP computing every token in the towers' last layers, as PyTorch does (`--same-work`)."""
    from medclip import FlaxHybridCLIP

    class FullLastLayerCLIP(FlaxHybridCLIP):
        def pool_image(self, pixel_values, *, train=False, dropout_rng=None):
            return self.vision_model(pixel_values, dropout_rng=dropout_rng, pooled_only=False, train=train)[1]

        def pool_text(self, *args, with_hidden=False, **kwargs):  # the hidden states: every token
            del with_hidden
            return super().pool_text(*args, with_hidden=True, **kwargs)

    return FullLastLayerCLIP


def build_ours(cfg: BenchConfig, torch_model=None, full_last_layer: bool = False, dtype: str = "float32"):
    """Our model (compute in `dtype`, parameters fp32); with the PyTorch model's weights (through the real
    checkpoint loader) when there is one."""
    import jax.numpy as jnp

    from medclip import FlaxHybridCLIP
    from medclip.models import BertConfig, CLIPVisionConfig, HybridCLIPConfig

    model_class = full_last_layer_class() if full_last_layer else FlaxHybridCLIP
    if torch_model is not None:
        with tempfile.TemporaryDirectory() as folder:
            torch_model.save_pretrained(folder)
            return model_class.from_pretrained(folder, dtype=jnp.dtype(dtype))
    vision = CLIPVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=4 * cfg.vision_hidden,
                              num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_hidden // 64,
                              image_size=cfg.image_size, patch_size=cfg.patch_size)
    text = BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.text_hidden, intermediate_size=4 * cfg.text_hidden,
                      num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_hidden // 64,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return model_class(HybridCLIPConfig(vision, text, projection_dim=cfg.projection_dim), dtype=jnp.dtype(dtype))


class StepTimes(NamedTuple):
    wall: float  # seconds
    cpu: float  # process CPU seconds, every thread of the process that ran the steps
    loss: float  # the last step's
    peak_memory: int | None = None  # device bytes (PyTorch on CUDA: max_memory_allocated since the first step)


class InProcessStep:
    """A step run in this process: `__call__` starts one (asynchronously where the backend allows), `sync`
    waits for the last and returns its loss. The open_clip worker times its steps with this same `run`."""

    def __call__(self) -> None:
        raise NotImplementedError

    def sync(self) -> float:
        raise NotImplementedError

    def peak_memory(self) -> int | None:
        return None

    def run(self, n: int) -> StepTimes:
        t, c = time.perf_counter(), time.process_time()
        for _ in range(n):
            self()
        loss = self.sync()
        return StepTimes(time.perf_counter() - t, time.process_time() - c, loss, self.peak_memory())


class JaxStep(InProcessStep):
    """Our real training step, jitted with the state donated; BatchNorm statistics in the state, as the
    trainer keeps them."""

    def __init__(self, model, batch: dict[str, np.ndarray], device, total_steps: int, text_packing=None):
        import jax
        from flax import nnx

        from medclip.training.optim import OptimizerConfig, decay_mask, make_optimizer
        from medclip.training.step import StepConfig, init_state, make_train_step

        self.jax = jax
        graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        params = jax.device_put(nnx.to_pure_dict(params), device)
        batch_stats = jax.device_put(nnx.to_pure_dict(batch_stats), device)
        leaves, decays = jax.tree.leaves(params), jax.tree.leaves(decay_mask(params))
        self.parameter_elements = sum(x.size for x in leaves)
        self.decayed_elements = sum(x.size for x, decay in zip(leaves, decays) if decay)
        tx, _ = make_optimizer(params, OptimizerConfig(learning_rate=5e-5, total_steps=total_steps,
                                                       weight_decay=0.1, max_grad_norm=1.0))
        self.state = init_state(params, tx, seed=0, batch_stats=batch_stats)
        self.batch = jax.device_put({k: jax.numpy.asarray(v) for k, v in batch.items()}, device)
        step = jax.jit(make_train_step(graphdef, tx, StepConfig(), text_packing), donate_argnums=0)
        t = time.perf_counter()
        self.compiled = step.lower(self.state, self.batch).compile()
        self.compile_seconds = time.perf_counter() - t
        self.metrics = None
        self.device = device
        memory = self.compiled.memory_analysis()  # the step's own footprint, whatever ran before in the process
        self.step_memory = None if memory is None else int(
            memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
            - memory.alias_size_in_bytes)

    def peak_memory(self) -> int | None:
        stats = self.device.memory_stats() if self.device.platform != "cpu" else None
        return None if not stats else stats.get("peak_bytes_in_use")

    def __call__(self) -> None:
        self.state, self.metrics = self.compiled(self.state, self.batch)

    def sync(self) -> float:
        self.jax.block_until_ready(self.state)
        return float(self.metrics["loss"])


class TorchStep(InProcessStep):
    """A PyTorch training step: `loss()` (forward to the loss), backward, clip, AdamW, schedule. The
    transformers peer runs it here, the open_clip worker in its own process."""

    def __init__(self, model, loss: Callable[[], Any], no_decay: set[str], device: str, total_steps: int,
                 autocast: str | None = None):
        import torch

        self.torch = torch
        self.device = device
        self.loss = loss
        self.autocast = None if autocast in (None, "float32") else getattr(torch, autocast)
        self.model = model.to(device).train()
        named = list(self.model.named_parameters())
        decayed = [p for n, p in named if n not in no_decay]
        groups = [{"params": decayed, "weight_decay": 0.1},
                  {"params": [p for n, p in named if n in no_decay], "weight_decay": 0.0}]
        self.parameter_elements = sum(p.numel() for _, p in named)
        self.decayed_elements = sum(p.numel() for p in decayed)
        # fused: torch's fastest AdamW here (one core, tiny: 2.42 s/step against 2.44 foreach, 2.56 for-loop).
        self.optimizer = torch.optim.AdamW(groups, lr=5e-5, betas=(0.9, 0.999), eps=1e-8, fused=True)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: max(0.0, 1 - s / total_steps))
        self.last_loss = None
        self.peak_reset = False

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.device == "cuda" and not self.peak_reset:  # from the first step on: weights, moments, activations
            self.torch.cuda.reset_peak_memory_stats()
            self.peak_reset = True
        with self.torch.autocast(self.device, dtype=self.autocast, enabled=self.autocast is not None):
            loss = self.loss()  # forward and loss under autocast, backward outside it (PyTorch's AMP recipe)
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.schedule.step()
        self.last_loss = loss

    def sync(self) -> float:
        if self.device == "cuda":
            self.torch.cuda.synchronize()
        return float(self.last_loss.detach().float())

    def peak_memory(self) -> int | None:
        return self.torch.cuda.max_memory_allocated() if self.device == "cuda" else None


def hf_torch_step(model, batch: dict[str, np.ndarray], device: str, total_steps: int, autocast: str | None = None,
                  compile_model: bool = False) -> TorchStep:
    """transformers' dual encoder with its built-in CLIP loss (`return_loss=True`); `compile_model`: the forward
    through `torch.compile` (the optimizer step stays eager)."""
    import torch

    from medclip.training.optim import NO_DECAY

    def no_decay(name: str) -> bool:  # the same parameters as our NO_DECAY, in transformers' names
        return (bool(NO_DECAY.search(name)) or "LayerNorm" in name or name.endswith("embeddings.weight")
                or name.endswith("position_embedding.weight"))

    inputs = {
        "input_ids": torch.tensor(batch["input_ids"], dtype=torch.long, device=device),
        "attention_mask": torch.tensor(batch["attention_mask"], dtype=torch.long, device=device),
        "pixel_values": torch.tensor(batch["pixel_values"].transpose(0, 3, 1, 2).copy(), device=device),
    }
    exempt = {n for n, _ in model.named_parameters() if no_decay(n)}
    model = model.to(device)
    forward = torch.compile(model) if compile_model else model
    return TorchStep(model, lambda: forward(**inputs, return_loss=True).loss, exempt, device, total_steps, autocast)


class OpenCLIPWorker:
    """open_clip's step in benchmarks/openclip_step_worker.py, a subprocess of the reference venv. `run(n)`
    asks for n steps in one message and returns the worker's own wall and CPU seconds (the same
    `InProcessStep.run` as ours), so neither the pipe nor this process's CPU time is in them."""

    def __init__(self, python: str, folder: Path, *, threads: int, device: str, total_steps: int,
                 autocast: str | None = None, compile_model: bool = False):
        command = [python, str(WORKER), str(folder), "--threads", str(threads), "--device", device,
                   "--total-steps", str(total_steps), *(["--autocast", autocast] if autocast else []),
                   *(["--compile"] if compile_model else [])]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._reply()
        self.parameter_elements = self.info["parameter_elements"]
        self.decayed_elements = self.info["decayed_elements"]

    def _reply(self) -> dict[str, Any]:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the open_clip worker exited with status {self.process.wait()} (its error is above)")
        return json.loads(line)

    def run(self, n: int) -> StepTimes:
        self.process.stdin.write(json.dumps({"run": n}) + "\n")
        self.process.stdin.flush()
        return StepTimes(**self._reply())

    def close(self) -> None:
        """EOF ends the worker (after the step it is in, if any)."""
        if not self.process.stdin.closed:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> OpenCLIPWorker:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def peer_name(mode: str) -> str:
    return "torch" if mode == "eager" else f"torch-{mode}"


def build_vit_pair(cfg: BenchConfig, args: argparse.Namespace, batch: dict[str, np.ndarray], jax_device,
                   torch_device: str | None, plan, stack: contextlib.ExitStack) -> tuple[JaxStep, dict[str, TorchStep]]:
    """Ours with transformers' weights (random ones without torch) and transformers' step, one per torch mode
    (each its own copy of the same initial weights)."""
    import copy

    del stack
    torch_model = build_torch_model(cfg) if torch_device else None
    ours = JaxStep(build_ours(cfg, torch_model, args.same_work, args.dtype), batch, jax_device, TOTAL_STEPS, plan)
    peers = {}
    if torch_model is not None:
        for mode in args.torch_modes:
            peers[peer_name(mode)] = hf_torch_step(copy.deepcopy(torch_model), batch, torch_device, TOTAL_STEPS,
                                                   args.dtype, compile_model=mode == "compile")
    return ours, peers


def build_resnet_pair(cfg: ResNetBenchConfig, args: argparse.Namespace, batch: dict[str, np.ndarray],
                      jax_device, torch_device: str | None, plan, stack: contextlib.ExitStack
                      ) -> tuple[JaxStep, dict[str, OpenCLIPWorker]]:
    """Ours loaded from the OpenCLIP folder the open_clip worker wrote (random weights with --no-torch), and
    a worker per torch mode (the same seeded weights each). The folder (with the BERT config both sides read)
    lives until `stack` closes."""
    del torch_device  # the worker has its own torch
    import jax.numpy as jnp

    from medclip import FlaxHybridCLIP
    from medclip.checkpoints.openclip import config_from_open_clip

    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"train_step-{cfg.name}-")))
    (folder / "bert").mkdir()
    (folder / "bert" / "config.json").write_text(json.dumps(cfg.bert_config(), indent=2) + "\n")
    model_cfg = cfg.open_clip_model_cfg(folder / "bert")
    model_class = full_last_layer_class() if args.same_work else FlaxHybridCLIP
    dtype = jnp.dtype(args.dtype)
    if args.no_torch:
        model = model_class(config_from_open_clip(model_cfg), dtype=dtype)
        return JaxStep(model, batch, jax_device, TOTAL_STEPS, plan), {}
    (folder / "spec.json").write_text(json.dumps({"model_cfg": model_cfg, "seed": 0}) + "\n")
    np.save(folder / "input_ids.npy", batch["input_ids"])
    np.save(folder / "pixel_values.npy", batch["pixel_values"].transpose(0, 3, 1, 2))  # NCHW for torch
    peers = {peer_name(mode): stack.enter_context(OpenCLIPWorker(
        args.ref_python, folder, threads=len(os.sched_getaffinity(0)),
        device="cuda" if jax_device.platform == "gpu" else "cpu", total_steps=TOTAL_STEPS,
        autocast=None if args.dtype == "float32" else args.dtype, compile_model=mode == "compile"))
        for mode in args.torch_modes}  # each writes the same seeded weights; ours loads them after
    model = model_class.from_pretrained(folder / "open_clip", dtype=dtype)
    return JaxStep(model, batch, jax_device, TOTAL_STEPS, plan), peers


def check_same_training(ours: JaxStep, peers: dict) -> None:
    """Both sides must train the same parameters with the same weight decay, or the comparison is not of one
    step: a peer exempting other parameters than NO_DECAY would go unnoticed in the first loss."""
    mine = (ours.parameter_elements, ours.decayed_elements)
    for name, peer in peers.items():
        theirs = (peer.parameter_elements, peer.decayed_elements)
        if mine != theirs:
            raise RuntimeError(f"(parameters, decayed parameters): ours {mine}, {name}'s {theirs}")


# ---------------------------------------------------------------------------------------------------------
def measure(steppers: dict, warmup: int, windows: int, steps: int
            ) -> tuple[dict[str, float], dict[str, list[StepTimes]]]:
    """First losses, then `windows` timing windows of `steps` steps each, alternating which side goes first."""
    first_loss = {}
    for name, step in steppers.items():  # the first step of each: same weights and batch, so the same loss
        first_loss[name] = step.run(1).loss
        for _ in range(warmup):
            step.run(1)
    times = {name: [] for name in steppers}
    for window in range(windows):
        order = list(steppers) if window % 2 == 0 else list(steppers)[::-1]
        for name in order:
            times[name].append(steppers[name].run(steps))
    return first_loss, times


def run_config(cfg: BenchConfig | ResNetBenchConfig, args: argparse.Namespace, jax_device,
               torch_device: str | None) -> dict:
    if args.batch:
        cfg = dataclasses.replace(cfg, batch=args.batch)
    batch = make_batch(cfg)
    steps = args.steps or cfg.steps_per_window * (10 if jax_device.platform != "cpu" else 1)
    from medclip.models.packing import plan_packing

    # The trainer's text packing (single device: one group, --text_packing_sizes default 8).
    plan = None if args.same_work else plan_packing(batch["attention_mask"], groups=1, sizes=8)
    build = build_resnet_pair if isinstance(cfg, ResNetBenchConfig) else build_vit_pair
    with contextlib.ExitStack() as stack:  # the open_clip workers and their folder end with the config
        ours, peers = build(cfg, args, batch, jax_device, torch_device, plan, stack)
        check_same_training(ours, peers)
        first_loss, times = measure({"ours": ours, **peers}, args.warmup, args.windows, steps)
        versions = next((p.info for p in peers.values() if hasattr(p, "info")), None)
    # Model FLOPs (MFU's numerator, every side): the full model, as PyTorch runs it. Our executed FLOPs come
    # from XLA's cost analysis, checked against the analytic count of what our step computes.
    flops_model, flops_xla = cfg.model_flops(), xla_flops(ours.compiled)
    flops_ours = cfg.our_flops(args.same_work, plan and plan.tokens)
    agree = flops_xla is not None and abs(flops_xla / flops_ours - 1) < 0.10

    def summary(name: str) -> dict:
        peaks = [t.peak_memory for t in times[name] if t.peak_memory is not None]
        return {"pairs_per_s": statistics.median(cfg.batch * steps / t.wall for t in times[name]),
                "cpu_seconds_per_step": statistics.median(t.cpu for t in times[name]) / steps,
                "window_seconds": [t.wall for t in times[name]], "first_loss": first_loss[name],
                "first_loss_relative_difference": (abs(first_loss[name] / first_loss["ours"] - 1)
                                                   if name != "ours" else None),
                "peak_memory_bytes": max(peaks) if peaks else None}

    sides = {name: summary(name) for name in times}
    sides["ours"]["step_memory_bytes"] = ours.step_memory
    resnet = isinstance(cfg, ResNetBenchConfig)
    return {
        "config": cfg.name, "batch": cfg.batch, "dtype": args.dtype, "steps_per_window": steps,
        "windows": args.windows, "peer": ("open_clip" if resnet else "transformers") if peers else None,
        "peer_versions": versions, "sides": sides,
        "flops_model": flops_model, "flops_executed": flops_xla if agree else flops_ours,
        "flops_executed_source": "xla" if agree else "analytic", "flops_xla": flops_xla,
        "flops_analytic_executed": flops_ours, "same_work": args.same_work,
        "parameter_elements": ours.parameter_elements, "decayed_elements": ours.decayed_elements,
        "real_text_tokens": int(batch["attention_mask"].sum()), "packed_text_tokens": plan and plan.tokens,
        "compile_seconds": ours.compile_seconds, "bench_config": dataclasses.asdict(cfg),
    }


def add_rates(result: dict, peak: float) -> None:
    model_per_pair, executed_per_pair = (result[k] / result["batch"] for k in ("flops_model", "flops_executed"))
    ours = result["sides"]["ours"]["pairs_per_s"]
    result["ours_gflops"] = executed_per_pair * ours / 1e9
    for side in result["sides"].values():
        side["mfu"] = model_per_pair * side["pairs_per_s"] / peak
        side["ours_over_this"] = ours / side["pairs_per_s"]


def format_table(results: list[dict], peak: float) -> str:
    def f(x, spec):
        return "-" if x is None else format(x, spec)

    def gib(x):
        return "-" if x is None else f"{x / 2 ** 30:.2f}"

    dtype = results[0]["dtype"] if results else "float32"
    lines = [f"{dtype} matmul peak (best measured in this run): {peak / 1e9:.1f} GFLOP/s", "",
             "| config | batch | dtype | side | pairs/s | ours / side | MFU | model GFLOP/step "
             "| executed GFLOP/step (ours) | executed GFLOP/s (ours) | peak memory GiB | CPU s/step | first loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for name, side in r["sides"].items():
            label = name if name == "ours" else f"{r['peer']} {name.replace('torch', 'PyTorch')}"
            ours = name == "ours"
            memory = gib(side["peak_memory_bytes"])
            if ours and side.get("step_memory_bytes") is not None:
                memory = f"{gib(side['step_memory_bytes'])} step (XLA), {memory} device peak"
            lines.append(
                f"| {r['config']} | {r['batch']} | {r['dtype']} | {label} | {side['pairs_per_s']:.2f} "
                f"| {side['ours_over_this']:.3f} | {side['mfu']:.1%} | {r['flops_model'] / 1e9:.1f} "
                f"| {(r['flops_executed'] / 1e9 if ours else r['flops_model'] / 1e9):.1f}"
                f"{' (' + r['flops_executed_source'] + ')' if ours else ''} "
                f"| {f(r['ours_gflops'] if ours else None, '.1f')} | {memory} "
                f"| {side['cpu_seconds_per_step']:.2f} | {side['first_loss']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny,small,base", help="comma-separated: " + ",".join(CONFIGS))
    parser.add_argument("--steps", type=int, default=0, help="steps per timing window (0: per-config default)")
    parser.add_argument("--windows", type=int, default=5, help="timing windows (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps after the first (compile) step")
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    parser.add_argument("--cores", type=int, default=0,
                        help="pin the process to this many cores, for JAX and torch alike (0: all it may use)")
    parser.add_argument("--no-torch", action="store_true", help="time ours only")
    parser.add_argument("--same-work", action="store_true",
                        help="ours does PyTorch's work: text padded, every token in the last layers")
    parser.add_argument("--ref-python", default=str(ROOT / ".venv-ref" / "bin" / "python"),
                        help="the reference venv's Python, with open_clip, for the rn50 configs' PyTorch peer")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="compute dtype: ours (parameters fp32) and PyTorch's autocast; auto: bfloat16 on GPU, "
                             "float32 on CPU (what --dtype auto trains with)")
    parser.add_argument("--torch-modes", default="auto",
                        help="PyTorch peers, comma-separated: eager, compile (torch.compile); auto: eager on CPU, "
                             "eager,compile on GPU")
    parser.add_argument("--batch", type=int, default=0, help="override every config's batch (0: the config's)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.configs.split(",")]
    if unknown := [n for n in names if n not in CONFIGS]:
        parser.error(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    needs_ref = not args.no_torch and any(isinstance(CONFIGS[n], ResNetBenchConfig) for n in names)
    if needs_ref and not Path(args.ref_python).is_file():
        parser.error(f"{args.ref_python} not found: the rn50 configs' PyTorch peer (open_clip, which needs "
                     "torchvision) runs in the reference venv; build it with `make .venv-ref/.ref` (the venv "
                     "`make golden` uses), point --ref-python at one, or time ours only with --no-torch")

    if args.cores:  # before JAX starts: its CPU client sizes its thread pool from the affinity mask
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])
    cores = len(os.sched_getaffinity(0))
    from medclip.training.host_memory import keep_host_memory_mapped

    host_memory_kept = keep_host_memory_mapped()  # before JAX starts, as run_hybrid_clip.py does
    # On a GPU, JAX takes memory as it needs it, up to 45%, leaving the rest to PyTorch (no effect on CPU).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")

    import jax

    platform_name = args.device
    if platform_name == "auto":
        platform_name = "gpu" if any(d.platform == "gpu" for d in jax.devices()) else "cpu"
    jax_device = jax.devices(platform_name)[0]
    if args.dtype == "auto":
        args.dtype = "float32" if platform_name == "cpu" else "bfloat16"
    modes = ("eager" if platform_name == "cpu" else "eager,compile") if args.torch_modes == "auto" else args.torch_modes
    args.torch_modes = [m.strip() for m in modes.split(",") if m.strip()]
    if bad := [m for m in args.torch_modes if m not in ("eager", "compile")]:
        parser.error(f"--torch-modes: unknown {bad}; choose from eager, compile")
    torch_device = None
    if not args.no_torch:
        try:
            import torch

            if platform_name == "cpu":
                torch.set_num_threads(cores)  # as many threads as JAX's CPU client uses
                torch_device = "cpu"
            elif torch.cuda.is_available():
                torch.backends.cuda.matmul.allow_tf32 = False  # true fp32, as JAX is set below
                torch.backends.cudnn.allow_tf32 = False
                torch_device = "cuda"
            else:
                print("torch has no CUDA here: timing ours only")
        except ImportError:
            print("torch is not installed: timing ours only")
    if platform_name == "gpu" and args.dtype == "float32":
        jax.config.update("jax_default_matmul_precision", "highest")  # true fp32, no TF32, like torch above

    load_before = os.getloadavg()
    peaks = matmul_peak(jax_device, torch_device, args.dtype)
    print(f"device: {jax_device.device_kind} ({platform_name}); cores: {cores}; load average {load_before[0]:.1f}; "
          f"{args.dtype} matmul GFLOP/s: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in peaks.items()), flush=True)

    results = []
    tolerance = 1e-4 if args.dtype == "float32" else 2e-2  # bf16 rounds every activation
    for name in names:
        result = run_config(CONFIGS[name], args, jax_device, torch_device)
        for k, v in matmul_peak(jax_device, torch_device, args.dtype).items():  # the machine may be quieter now
            peaks[k] = max(peaks[k], v)
        add_rates(result, max(peaks.values()))
        results.append(result)
        print("\n".join(format_table([result], max(peaks.values())).splitlines()[4:]), flush=True)
        for side_name, side in result["sides"].items():
            if (difference := side["first_loss_relative_difference"]) is not None:
                verdict = ("agree" if difference < tolerance
                           else f"DISAGREE (same weights and batch: expected < {tolerance})")
                print(f"  first loss ours {result['sides']['ours']['first_loss']:.6f}, {result['peer']} {side_name} "
                      f"{side['first_loss']:.6f}: {verdict}, relative difference {difference:.1e}", flush=True)
        windows = ", ".join(f"{n} {['%.2f' % t for t in side['window_seconds']]}"
                            for n, side in result["sides"].items())
        print(f"  windows (s): {windows}; compile {result['compile_seconds']:.1f} s; "
              f"executed FLOPs xla {result['flops_xla'] or 0:.3e}, analytic {result['flops_analytic_executed']:.3e}",
              flush=True)
    peak = max(peaks.values())
    for result in results:  # MFU against the best peak seen in the whole run
        add_rates(result, peak)

    table = format_table(results, peak)
    load = f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after"
    print(f"\n{table}\n{load}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    command = " ".join(["benchmarks/train_step.py", *(argv if argv is not None else sys.argv[1:])])
    torch_version = sys.modules["torch"].__version__ if "torch" in sys.modules else None
    meta = {"command": command, "device": str(jax_device.device_kind), "platform": platform_name, "cores": cores,
            "machine": platform.processor() or platform.machine(), "peaks": peaks, "peak": peak,
            "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "jax": jax.__version__, "torch": torch_version, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "host_memory_kept_mapped": host_memory_kept, "results": results}
    (out / f"train_step-{platform_name}-{stamp}.json").write_text(json.dumps(meta, indent=2) + "\n")
    workers = sorted({f"torch {r['peer_versions']['torch']}, open_clip {r['peer_versions']['open_clip']}"
                      for r in results if r["peer_versions"]})
    worker = f"; open_clip worker: {', '.join(workers)}" if workers else ""
    (out / f"train_step-{platform_name}-{stamp}.md").write_text(
        f"`{command}` on {meta['device']} ({platform_name}, {cores} cores; {load}), "
        f"jax {meta['jax']}, torch {torch_version}{worker}, XLA_FLAGS={meta['xla_flags']!r}\n\n{table}\n")
    print(f"wrote {out}/train_step-{platform_name}-{stamp}.json and .md")


if __name__ == "__main__":
    main()
