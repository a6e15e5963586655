"""Benchmark: one training step of the dual encoder, ours (JAX) against transformers' PyTorch
`VisionTextDualEncoderModel`, both in this process, on the same batch and the same weights.

    .venv/bin/python benchmarks/train_step.py                        # tiny, small, base on this machine's CPU
    .venv/bin/python benchmarks/train_step.py --configs tiny --windows 9 --steps 4
    .venv/bin/python benchmarks/train_step.py --cores 1              # one core each: least sensitive to noise
    .venv/bin/python benchmarks/train_step.py --device gpu           # JAX (and torch, if it has CUDA) on a GPU

What runs
  ours     the real step: `medclip.training.step.make_train_step` (forward, symmetric InfoNCE, backward,
           global-norm clipping, AdamW with weight decay from `medclip.training.optim.make_optimizer`,
           non-finite skipping), jitted with the state donated.
  PyTorch  the same step in transformers: forward with `return_loss=True` (the same symmetric InfoNCE),
           backward, `clip_grad_norm_(1.0)`, AdamW (fused) with the same decay mask and a linear schedule.
  Both fp32, dropout 0 (set in the configs); the PyTorch weights are converted into ours through the real
  checkpoint loader, so the first losses must agree (printed as a check).

Configs (PERF_NOTES.md defines tiny and base; small sits in between). Heads are 64 wide, MLPs 4x hidden:
  tiny   ViT 4 x 256 (128 px, patch 16: 65 tokens) + BERT 4 x 256 (64 tokens, vocab 30522), proj 256, batch 64
  small  ViT 6 x 512 (224 px, patch 32: 50 tokens) + BERT 6 x 512 (128 tokens), proj 512, batch 32
  base   ViT-B/32 (224 px) + BERT-base (128 tokens), proj 512, batch 16

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
work, the like-for-like comparison of the two implementations' kernels.

FLOPs and MFU: MFU uses model FLOPs, an analytic matmul count of the full model (what PyTorch runs), for
both implementations, so it compares pairs/s on one scale. Our executed FLOPs come from XLA's cost analysis of
the compiled step (layers are unrolled, so it counts every layer), cross-checked against the analytic count of
what our step computes (the analytic count is used if they differ by more than 10%); "ours executed GFLOP/s"
is the rate our hardware work ran at. MFU divides by an fp32 matmul peak measured in this run (2048^3 on CPU,
8192^3 on GPU; the best of JAX and torch, measured before every config, highest value kept).

Host memory: like run_hybrid_clip.py, this calls `medclip.training.host_memory.keep_host_memory_mapped`
before JAX starts (glibc keeps XLA's per-step scratch memory mapped instead of page-faulting it in every
step). It applies to the whole process, PyTorch included; MEDCLIP_KEEP_HOST_MEMORY=0 turns it off.

Results: a table on stdout and benchmarks/results/train_step-<device>-<time>.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@dataclasses.dataclass(frozen=True)
class BenchConfig:
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


CONFIGS = {
    "tiny": BenchConfig("tiny", batch=64, image_size=128, patch_size=16, vision_layers=4, vision_hidden=256,
                        text_layers=4, text_hidden=256, text_length=64, projection_dim=256, steps_per_window=3),
    "small": BenchConfig("small", batch=32, image_size=224, patch_size=32, vision_layers=6, vision_hidden=512,
                         text_layers=6, text_hidden=512, text_length=128, projection_dim=512, steps_per_window=1),
    "base": BenchConfig("base", batch=16, image_size=224, patch_size=32, vision_layers=12, vision_hidden=768,
                        text_layers=12, text_hidden=768, text_length=128, projection_dim=512, steps_per_window=1),
}


# ---------------------------------------------------------------------------------------------------------
# FLOPs and peak
def analytic_flops(cfg: BenchConfig, pooled_only: bool = False, text_tokens: int | None = None) -> float:
    """Matmul FLOPs of one training step: 3x the forward (forward, input gradient, weight gradient), except
    the patch embedding, which needs no input gradient. Elementwise work, softmax, norms and the optimizer
    are left out (a few percent). Defaults: the full model, as PyTorch runs it. `pooled_only`: each tower's
    last layer for the pooled token only (its keys and values still for every token); `text_tokens`: the
    text tower's per-token work on that many (packed) tokens, attention still on the padded layout."""
    b = cfg.batch

    def encoder(tokens: int, length: int, hidden: int, layers: int) -> float:
        def layer(queries: int, query_tokens: int) -> float:  # k, v from every token; q, out, MLP per query
            dense = 2 * tokens * 2 * hidden * hidden + 2 * query_tokens * (2 + 8) * hidden * hidden
            return dense + 2 * 2 * b * queries * length * hidden  # scores and context

        last = layer(1, b) if pooled_only else layer(length, tokens)
        return (layers - 1) * layer(length, tokens) + last

    vision = encoder(b * (cfg.patches + 1), cfg.patches + 1, cfg.vision_hidden, cfg.vision_layers)
    text = encoder(text_tokens or b * cfg.text_length, cfg.text_length, cfg.text_hidden, cfg.text_layers)
    heads = 2 * b * (cfg.text_hidden * cfg.text_hidden  # BERT pooler
                     + (cfg.vision_hidden + cfg.text_hidden) * cfg.projection_dim) + 2 * b * b * cfg.projection_dim
    patch_embed = 2 * b * cfg.patches * 3 * cfg.patch_size ** 2 * cfg.vision_hidden
    return 3 * (vision + text + heads) + 2 * patch_embed


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


def matmul_peak(jax_device, torch_device: str | None, repeats: int = 10) -> dict[str, float]:
    """fp32 matmul FLOP/s of JAX (and torch) on this device: the yardstick for MFU."""
    import jax
    import jax.numpy as jnp

    n = 2048 if jax_device.platform == "cpu" else 8192
    a, b = (jax.device_put(jax.random.normal(jax.random.PRNGKey(i), (n, n), jnp.float32), jax_device)
            for i in range(2))
    matmul = jax.jit(lambda x, y: x @ y)
    peaks = {"jax": 2 * n ** 3 / best_seconds(lambda: matmul(a, b), jax.block_until_ready, repeats)}
    if torch_device:
        import torch

        ta, tb = torch.randn(n, n, device=torch_device), torch.randn(n, n, device=torch_device)
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
        def get_image_features(self, pixel_values, *, dropout_rng=None):
            return self.visual_projection(self.vision_model(pixel_values, dropout_rng=dropout_rng)[1])

        def get_text_features(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *,
                              dropout_rng=None, text_packing=None):
            _, pooled = self.text_model(input_ids, attention_mask, token_type_ids=token_type_ids,
                                        position_ids=position_ids, dropout_rng=dropout_rng, packing=text_packing)
            return self.text_projection(pooled)

    return FullLastLayerCLIP


def build_ours(cfg: BenchConfig, torch_model=None, full_last_layer: bool = False):
    """Our model; with the PyTorch model's weights (through the real checkpoint loader) when there is one."""
    import jax.numpy as jnp

    from medclip import FlaxHybridCLIP
    from medclip.models import BertConfig, CLIPVisionConfig, HybridCLIPConfig

    model_class = full_last_layer_class() if full_last_layer else FlaxHybridCLIP
    if torch_model is not None:
        with tempfile.TemporaryDirectory() as folder:
            torch_model.save_pretrained(folder)
            return model_class.from_pretrained(folder, dtype=jnp.float32)
    vision = CLIPVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=4 * cfg.vision_hidden,
                              num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_hidden // 64,
                              image_size=cfg.image_size, patch_size=cfg.patch_size)
    text = BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.text_hidden, intermediate_size=4 * cfg.text_hidden,
                      num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_hidden // 64,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return model_class(HybridCLIPConfig(vision, text, projection_dim=cfg.projection_dim))


class JaxStep:
    """Our real training step, jitted with the state donated."""

    def __init__(self, model, batch: dict[str, np.ndarray], device, total_steps: int, text_packing=None):
        import jax
        from flax import nnx

        from medclip.training.optim import OptimizerConfig, make_optimizer
        from medclip.training.step import StepConfig, init_state, make_train_step

        self.jax = jax
        graphdef, params = nnx.split(model, nnx.Param)
        params = jax.device_put(nnx.to_pure_dict(params), device)
        tx, _ = make_optimizer(params, OptimizerConfig(learning_rate=5e-5, total_steps=total_steps,
                                                       weight_decay=0.1, max_grad_norm=1.0))
        self.state = init_state(params, tx, seed=0)
        self.batch = jax.device_put({k: jax.numpy.asarray(v) for k, v in batch.items()}, device)
        step = jax.jit(make_train_step(graphdef, tx, StepConfig(loss="clip"), text_packing), donate_argnums=0)
        t = time.perf_counter()
        self.compiled = step.lower(self.state, self.batch).compile()
        self.compile_seconds = time.perf_counter() - t
        self.metrics = None

    def __call__(self) -> None:
        self.state, self.metrics = self.compiled(self.state, self.batch)

    def sync(self) -> float:
        self.jax.block_until_ready(self.state)
        return float(self.metrics["loss"])


class TorchStep:
    """transformers' dual encoder: forward with the built-in CLIP loss, backward, clip, AdamW, schedule."""

    def __init__(self, model, batch: dict[str, np.ndarray], device: str, total_steps: int):
        import torch

        from medclip.training.optim import NO_DECAY

        self.torch = torch
        self.device = device
        self.model = model.to(device).train()

        def no_decay(name: str) -> bool:  # the same parameters as our NO_DECAY, in transformers' names
            return (bool(NO_DECAY.search(name)) or "LayerNorm" in name or name.endswith("embeddings.weight")
                    or name.endswith("position_embedding.weight"))

        named = list(self.model.named_parameters())
        groups = [{"params": [p for n, p in named if not no_decay(n)], "weight_decay": 0.1},
                  {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0}]
        # fused: torch's fastest AdamW here (one core, tiny: 2.42 s/step against 2.44 foreach, 2.56 for-loop).
        self.optimizer = torch.optim.AdamW(groups, lr=5e-5, betas=(0.9, 0.999), eps=1e-8, fused=True)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: max(0.0, 1 - s / total_steps))
        self.inputs = {
            "input_ids": torch.tensor(batch["input_ids"], dtype=torch.long, device=device),
            "attention_mask": torch.tensor(batch["attention_mask"], dtype=torch.long, device=device),
            "pixel_values": torch.tensor(batch["pixel_values"].transpose(0, 3, 1, 2).copy(), device=device),
        }
        self.last_loss = None

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        out = self.model(**self.inputs, return_loss=True)
        out.loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.schedule.step()
        self.last_loss = out.loss

    def sync(self) -> float:
        if self.device == "cuda":
            self.torch.cuda.synchronize()
        return float(self.last_loss.detach())


# ---------------------------------------------------------------------------------------------------------
def time_steps(step, n: int) -> tuple[float, float]:
    """Wall and process CPU seconds for n steps (CPU time counts every thread of this process)."""
    t, c = time.perf_counter(), time.process_time()
    for _ in range(n):
        step()
    step.sync()
    return time.perf_counter() - t, time.process_time() - c


def run_config(cfg: BenchConfig, args, jax_device, torch_device: str | None) -> dict:
    batch = make_batch(cfg)
    steps = args.steps or cfg.steps_per_window * (10 if jax_device.platform != "cpu" else 1)
    total_steps = 10_000
    torch_model = build_torch_model(cfg) if torch_device else None
    from medclip.models.packing import plan_packing

    # The trainer's text packing (single device: one group, --text_packing_sizes default 8).
    plan = None if args.same_work else plan_packing(batch["attention_mask"], groups=1, sizes=8)
    ours = JaxStep(build_ours(cfg, torch_model, args.same_work), batch, jax_device, total_steps, plan)
    # Model FLOPs (MFU's numerator, both sides): the full model, as PyTorch runs it. Our executed FLOPs come
    # from XLA's cost analysis, checked against the analytic count of what our step computes.
    flops_model, flops_xla = analytic_flops(cfg), xla_flops(ours.compiled)
    flops_ours = analytic_flops(cfg, pooled_only=not args.same_work, text_tokens=plan and plan.tokens)
    agree = flops_xla is not None and abs(flops_xla / flops_ours - 1) < 0.10
    peer = TorchStep(torch_model, batch, torch_device, total_steps) if torch_model is not None else None
    steppers = {"ours": ours, "torch": peer} if peer is not None else {"ours": ours}

    first_loss = {}
    for name, step in steppers.items():  # the first step of each: same weights and batch, so the same loss
        step()
        first_loss[name] = step.sync()
        for _ in range(args.warmup):
            step(), step.sync()

    times = {name: [] for name in steppers}
    for window in range(args.windows):
        order = list(steppers) if window % 2 == 0 else list(steppers)[::-1]
        for name in order:
            times[name].append(time_steps(steppers[name], steps))

    def summary(name: str) -> dict:
        if name not in times:
            return {"pairs_per_s": None, "cpu_seconds_per_step": None, "window_seconds": []}
        return {"pairs_per_s": statistics.median(cfg.batch * steps / wall for wall, _ in times[name]),
                "cpu_seconds_per_step": statistics.median(cpu for _, cpu in times[name]) / steps,
                "window_seconds": [wall for wall, _ in times[name]]}

    return {
        "config": cfg.name, "batch": cfg.batch, "steps_per_window": steps, "windows": args.windows,
        "ours": summary("ours"), "torch": summary("torch"),
        "flops_model": flops_model, "flops_executed": flops_xla if agree else flops_ours,
        "flops_executed_source": "xla" if agree else "analytic", "flops_xla": flops_xla,
        "flops_analytic_executed": flops_ours, "same_work": args.same_work,
        "real_text_tokens": int(batch["attention_mask"].sum()), "packed_text_tokens": plan and plan.tokens,
        "first_loss_ours": first_loss["ours"], "first_loss_torch": first_loss.get("torch"),
        "compile_seconds": ours.compile_seconds, "bench_config": dataclasses.asdict(cfg),
    }


def add_rates(result: dict, peak: float) -> None:
    ours, torch = result["ours"]["pairs_per_s"], result["torch"]["pairs_per_s"]
    model_per_pair, executed_per_pair = (result[k] / result["batch"] for k in ("flops_model", "flops_executed"))
    result["ratio"] = ours / torch if torch else None
    result["ours_gflops"] = executed_per_pair * ours / 1e9
    result["ours_mfu"] = model_per_pair * ours / peak
    result["torch_mfu"] = model_per_pair * torch / peak if torch else None


def format_table(results: list[dict], peak: float) -> str:
    def f(x, spec):
        return "-" if x is None else format(x, spec)

    lines = [f"fp32 matmul peak (best measured in this run): {peak / 1e9:.1f} GFLOP/s", "",
             "| config | batch | ours pairs/s | PyTorch pairs/s | ours/PyTorch | model GFLOP/step "
             "| ours executed GFLOP/step | ours executed GFLOP/s | ours MFU | PyTorch MFU "
             "| CPU s/step ours / PyTorch | first loss ours / PyTorch |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['config']} | {r['batch']} | {r['ours']['pairs_per_s']:.2f} | {f(r['torch']['pairs_per_s'], '.2f')} "
            f"| {f(r['ratio'], '.3f')} | {r['flops_model'] / 1e9:.1f} "
            f"| {r['flops_executed'] / 1e9:.1f} ({r['flops_executed_source']}) "
            f"| {r['ours_gflops']:.1f} | {r['ours_mfu']:.1%} | {f(r['torch_mfu'], '.1%')} "
            f"| {r['ours']['cpu_seconds_per_step']:.2f} / {f(r['torch']['cpu_seconds_per_step'], '.2f')} "
            f"| {r['first_loss_ours']:.4f} / {f(r['first_loss_torch'], '.4f')} |")
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
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.configs.split(",")]
    if unknown := [n for n in names if n not in CONFIGS]:
        parser.error(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")

    if args.cores:  # before JAX starts: its CPU client sizes its thread pool from the affinity mask
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])
    cores = len(os.sched_getaffinity(0))
    from medclip.training.host_memory import keep_host_memory_mapped

    host_memory_kept = keep_host_memory_mapped()  # before JAX starts, as run_hybrid_clip.py does

    import jax

    platform_name = args.device
    if platform_name == "auto":
        platform_name = "gpu" if any(d.platform == "gpu" for d in jax.devices()) else "cpu"
    jax_device = jax.devices(platform_name)[0]
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
    if platform_name == "gpu":
        jax.config.update("jax_default_matmul_precision", "highest")  # true fp32, no TF32, like torch above

    load_before = os.getloadavg()
    peaks = matmul_peak(jax_device, torch_device)
    print(f"device: {jax_device.device_kind} ({platform_name}); cores: {cores}; load average {load_before[0]:.1f}; "
          f"fp32 matmul GFLOP/s: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in peaks.items()), flush=True)

    results = []
    for name in names:
        result = run_config(CONFIGS[name], args, jax_device, torch_device)
        for k, v in matmul_peak(jax_device, torch_device).items():  # the machine may be quieter now
            peaks[k] = max(peaks[k], v)
        add_rates(result, max(peaks.values()))
        results.append(result)
        print(format_table([result], max(peaks.values())).splitlines()[-1], flush=True)
        print(f"  windows (s): ours {['%.2f' % t for t in result['ours']['window_seconds']]}, "
              f"torch {['%.2f' % t for t in result['torch']['window_seconds']]}; compile {result['compile_seconds']:.1f} s; "
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
    (out / f"train_step-{platform_name}-{stamp}.md").write_text(
        f"`{command}` on {meta['device']} ({platform_name}, {cores} cores; {load}), "
        f"jax {meta['jax']}, torch {torch_version}, XLA_FLAGS={meta['xla_flags']!r}\n\n{table}\n")
    print(f"wrote {out}/train_step-{platform_name}-{stamp}.json and .md")


if __name__ == "__main__":
    main()
