"""Benchmark: the training step's fp32 matmuls alone, XLA:CPU (JAX) against PyTorch, in one process.

    .venv/bin/python benchmarks/matmul_shapes.py                     # tiny config's shapes, one core
    .venv/bin/python benchmarks/matmul_shapes.py --config small --cores 2

Why: matmuls are 80-88% of a CPU training step (profiles of `benchmarks/train_step.py`), so how XLA:CPU's
GEMM (YNNPACK) compares with PyTorch's (MKL) on exactly these shapes bounds what the step can reach against
PyTorch. Each shape runs in the three forms one dense layer needs, written as our layers write them
(`medclip.models.kernels.cpu.dense`): forward x @ W, input gradient dy @ W^T, kernel gradient as a plain
product with the narrower of x and dy transposed beforehand, as `_weight_grad` does on CPU.
JAX and PyTorch alternate round by round; the ratio is the median over rounds of torch time / JAX time
(above 1: JAX faster), so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import CONFIGS, best_seconds  # noqa: E402


def shapes(config_name: str) -> list[tuple[str, int, int, int]]:
    """(layer, tokens, in, out) of the text tower's dense layers (the vision tower's differ only in tokens)."""
    cfg = CONFIGS[config_name]
    tokens, hidden = cfg.batch * cfg.text_length, cfg.text_hidden
    return [("qkv", tokens, hidden, 3 * hidden), ("attn out", tokens, hidden, hidden),
            ("fc1", tokens, hidden, 4 * hidden), ("fc2", tokens, 4 * hidden, hidden)]


def time_pair(lhs, rhs, transposed: bool, rounds: int, repeats: int) -> list[tuple[float, float]]:
    """(JAX seconds, PyTorch seconds) of lhs @ rhs (rhs^T if transposed), best of `repeats`, per round."""
    import jax
    import jax.numpy as jnp
    import torch

    jl, jr = jnp.asarray(lhs), jnp.asarray(rhs)
    tl, tr = torch.from_numpy(lhs), torch.from_numpy(rhs)
    product = jax.jit(lambda a, b: a @ (b.T if transposed else b))
    run_jax, run_torch = (lambda: product(jl, jr)), (lambda: tl @ (tr.T if transposed else tr))
    no_sync = lambda _: None  # noqa: E731  (torch on CPU returns when done)
    return [(best_seconds(run_jax, jax.block_until_ready, repeats), best_seconds(run_torch, no_sync, repeats))
            for _ in range(rounds)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--cores", type=int, default=1, help="cores for both (JAX sizes its pool from this)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per round (best kept)")
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])  # before JAX and torch start

    import jax
    import numpy as np
    import torch

    torch.set_num_threads(args.cores)
    print(f"jax {jax.__version__}, torch {torch.__version__}, {args.cores} core(s), config {args.config}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print("| layer | form | shape | JAX GFLOP/s | PyTorch GFLOP/s | PyTorch time / JAX time |")
    print("|---|---|---|---|---|---|")
    ratios = []
    rng = np.random.default_rng(0)
    for layer, tokens, n_in, n_out in shapes(args.config):
        x = rng.standard_normal((tokens, n_in), np.float32)
        w = rng.standard_normal((n_in, n_out), np.float32)
        dy = rng.standard_normal((tokens, n_out), np.float32)
        forms = {  # name: (lhs, rhs, rhs transposed in the product)
            "forward x @ W": (x, w, False),
            "input grad dy @ W^T": (dy, w, True),
        }
        if n_in <= n_out:  # the narrower operand is transposed beforehand, as `_weight_grad` does on CPU
            forms["kernel grad x^T @ dy"] = (np.ascontiguousarray(x.T), dy, False)
        else:
            forms["kernel grad dy^T @ x"] = (np.ascontiguousarray(dy.T), x, False)
        for form, (lhs, rhs, transposed) in forms.items():
            flops = 2 * lhs.shape[0] * lhs.shape[1] * (rhs.shape[0] if transposed else rhs.shape[1])
            pairs = time_pair(lhs, rhs, transposed, args.rounds, args.repeats)
            ratio = statistics.median(t / j for j, t in pairs)
            ratios.append(ratio)
            j_rate = flops / statistics.median(j for j, _ in pairs) / 1e9
            t_rate = flops / statistics.median(t for _, t in pairs) / 1e9
            shape = f"{lhs.shape[0]}x{lhs.shape[1]} @ {rhs.shape[::-1] if transposed else rhs.shape}"
            print(f"| {layer} | {form} | {shape} | {j_rate:.1f} | {t_rate:.1f} | {ratio:.3f} |")
    print(f"geometric mean of PyTorch time / JAX time over {len(ratios)} products: "
          f"{statistics.geometric_mean(ratios):.3f} (above 1: JAX faster)")


if __name__ == "__main__":
    main()
