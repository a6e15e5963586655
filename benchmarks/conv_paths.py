"""Benchmark: the convolution forms our conv towers use on CPU against XLA's plain lowering and PyTorch, per
RN50 (ModifiedResNet) layer shape, forward + backward (input and kernel gradients), in one process.

    .venv/bin/python benchmarks/conv_paths.py              # batch 16, RN50 at 224 px, both cores
    .venv/bin/python benchmarks/conv_paths.py --batch 64 --rounds 3

Why: in `benchmarks/train_step.py --configs rn50` XLA:CPU ran the RN50 tower's backward pass at well under half
PyTorch's speed while its forward was level. Three forms in `medclip.models.conv` close that (the first two in
`medclip.models.kernels.cpu`, used on CPU only): a 1x1 convolution as one matmul, the kernel gradient of a
convolution summed over slices of the batch, and (`medclip.models.conv`) a non-overlapping average pool as a
reshape + mean. Each row times `value_and_grad` of one layer in our form and in
the plain `lax` form (and torch.nn when torch is installed), alternating round by round; ratios are medians over
rounds of the other's time / ours (above 1: ours faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rn50_layers(batch: int, size: int = 224) -> list[tuple[str, str, tuple[int, ...], int, int, int]]:
    """(name, kind, input NHWC, out channels, kernel, stride) of each distinct RN50 layer shape."""
    s = size
    rows = [("stem conv1", "conv", (batch, s, s, 3), 32, 3, 2), ("stem conv2", "conv", (batch, s // 2, s // 2, 32), 32, 3, 1),
            ("stem conv3", "conv", (batch, s // 2, s // 2, 32), 64, 3, 1), ("stem pool", "pool", (batch, s // 2, s // 2, 64), 64, 2, 2)]
    inplanes, grid = 64, s // 4
    for stage, planes in enumerate((64, 128, 256, 512)):
        rows += [(f"layer{stage + 1} conv1", "conv", (batch, grid, grid, inplanes), planes, 1, 1),
                 (f"layer{stage + 1} conv2", "conv", (batch, grid, grid, planes), planes, 3, 1)]
        if stage:
            rows.append((f"layer{stage + 1} pool", "pool", (batch, grid, grid, planes), planes, 2, 2))
            grid //= 2
        rows += [(f"layer{stage + 1} conv3", "conv", (batch, grid, grid, planes), planes * 4, 1, 1)]
        inplanes = planes * 4
    return rows


def jax_pair(kind: str, shape, out: int, k: int, stride: int):
    """(ours, plain): jitted value_and_grad functions of (x, kernel) and their arguments."""
    import jax
    import jax.numpy as jnp

    from medclip.models import conv
    from medclip.models.kernels import cpu, plain

    x = jax.random.normal(jax.random.key(0), shape)
    kernel = jax.random.normal(jax.random.key(1), (k, k, shape[-1], out)) * 0.05
    if kind == "pool":
        plain_pool = lambda v, _: jax.lax.reduce_window(v, 0.0, jax.lax.add, (1, k, k, 1), (1, k, k, 1),  # noqa: E731
                                                        "VALID") / (k * k)
        forms = (lambda v, _: conv.avg_pool(v, k), plain_pool)
    else:
        pad = ((k // 2, k // 2),) * 2
        spec = conv.ConvSpec((stride, stride), pad, (1, 1), 1)
        forms = (lambda v, w: cpu.conv2d(v, w, spec), lambda v, w: plain.conv2d(v, w, spec))
    return [jax.jit(jax.value_and_grad(lambda v, w, f=f: jnp.sum(f(v, w) ** 2), argnums=(0, 1))) for f in forms], \
        (x, kernel)


def torch_step(kind: str, shape, out: int, k: int, stride: int):
    import torch

    n, h, w, c = shape
    x = torch.randn(n, c, h, w, requires_grad=True)
    layer = torch.nn.AvgPool2d(k) if kind == "pool" else torch.nn.Conv2d(c, out, k, stride, k // 2, bias=False)

    def step():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        (layer(x) ** 2).sum().backward()
    return step


def best(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per round (best kept)")
    parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch column")
    args = parser.parse_args(argv)

    import jax

    torch = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            pass
        else:
            torch.set_num_threads(os.cpu_count())
    print(f"jax {jax.__version__}" + (f", torch {torch.__version__} ({torch.get_num_threads()} threads)" if torch
                                      else "") + f", batch {args.batch}, RN50 at 224 px, forward + backward")
    print("| layer | input | kernel | ours ms | plain XLA ms | plain / ours | PyTorch ms | PyTorch / ours |")
    print("|---|---|---|---|---|---|---|---|")
    totals = {"ours": 0.0, "plain": 0.0, "torch": 0.0}
    for name, kind, shape, out, k, stride in rn50_layers(args.batch):
        (ours, plain), inputs = jax_pair(kind, shape, out, k, stride)
        runs = {"ours": lambda: jax.block_until_ready(ours(*inputs)),
                "plain": lambda: jax.block_until_ready(plain(*inputs))}
        if torch:
            runs["torch"] = torch_step(kind, shape, out, k, stride)
        for run in runs.values():
            run()  # compile / warm up
        rounds = [{key: best(run, args.repeats) for key, run in runs.items()} for _ in range(args.rounds)]
        med = {key: statistics.median(r[key] for r in rounds) for key in runs}
        for key in med:
            totals[key] += med[key]
        ratio = statistics.median(r["plain"] / r["ours"] for r in rounds)
        peer = (f"{med['torch'] * 1e3:.1f} | {statistics.median(r['torch'] / r['ours'] for r in rounds):.2f}"
                if torch else "- | -")
        what = f"{k}x{k}/{stride}" + (" pool" if kind == "pool" else f" -> {out}")
        print(f"| {name} | {'x'.join(map(str, shape[1:]))} | {what} | {med['ours'] * 1e3:.1f} | "
              f"{med['plain'] * 1e3:.1f} | {ratio:.2f} | {peer} |", flush=True)
    line = f"sum of medians (one of each shape): ours {totals['ours']:.3f} s, plain XLA {totals['plain']:.3f} s"
    print(line + (f", PyTorch {totals['torch']:.3f} s" if torch else ""))


if __name__ == "__main__":
    main()
