"""Benchmark: time to compute retrieval metrics from precomputed embeddings, against naive NumPy.

    .venv/bin/python benchmarks/retrieval.py                    # 10k and 100k pairs, 512-d
    .venv/bin/python benchmarks/retrieval.py --sizes 10000 --repeats 5

For each size it times, on the same random data:
  chunked      medclip.evaluation.retrieval.retrieval_metrics (both directions, one pass, chunked)
  gemm floor   the chunked score matmul alone (the part no implementation can skip): overhead reference
  naive count  full N x N score matrix in memory, then the same counting (only where it fits)
  naive sort   full N x N matrix + argsort of every row and column, the textbook way (only where it fits)
and counts the queries whose rank differs from ours. naive count uses the same tie rule, so it agrees
except where a score gap sits within an ulp of the 1e-6 tie tolerance itself (a full-matrix GEMM rounds
some entries differently from a chunked one); argsort breaks near-ties (gaps under 1e-6) arbitrarily, so
tens of differences per 10k queries are expected. Timings on a shared machine are noisy: the minimum
over repeats is the figure to quote, and the load average is printed alongside.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
from collections.abc import Callable

import numpy as np

from medclip.evaluation.retrieval import (
    DEFAULT_CHUNK_SIZE,
    TIE_TOLERANCE,
    format_results_table,
    retrieval_metrics,
)


def random_pairs(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit image embeddings and noisy unit text partners, float32.

    The noise puts a pair's cosine near 0.15, just above the largest of ~1e4-1e5 random cosines in 512-d
    (std 1/sqrt(512) = 0.044), so recalls land mid-range instead of at 100%.
    """
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n, dim), dtype=np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    texts = images + 6.5 * rng.standard_normal((n, dim), dtype=np.float32) / np.sqrt(dim, dtype=np.float32)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    return images, texts


def gemm_floor(images: np.ndarray, texts: np.ndarray, chunk_size: int) -> None:
    """Only the chunked score matmul: the unavoidable part of any exact implementation."""
    block = np.empty((min(chunk_size, len(images)), len(texts)), np.float32)
    for start in range(0, len(images), chunk_size):
        stop = min(start + chunk_size, len(images))
        np.matmul(images[start:stop], texts.T, out=block[: stop - start])


def naive_count(images: np.ndarray, texts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Full score matrix, then count items scoring >= the correct one (same tie rule as ours)."""
    scores = images @ texts.T  # (N, N)
    bar = np.diag(scores) - np.float32(TIE_TOLERANCE)
    np.fill_diagonal(scores, -np.inf)
    return (scores >= bar[:, None]).sum(1) + 1, (scores >= bar[None, :]).sum(0) + 1


def naive_sort(images: np.ndarray, texts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Full score matrix, argsort every row (and column), find where the correct item landed."""
    scores = images @ texts.T
    queries = np.arange(len(images))[:, None]
    i2t = np.argmax(np.argsort(-scores, axis=1) == queries, axis=1) + 1
    t2i = np.argmax(np.argsort(-scores.T, axis=1) == queries, axis=1) + 1
    return i2t, t2i


def time_it(fn: Callable[[], object], repeats: int) -> tuple[float, float, object]:
    """(min seconds, median seconds, last result)."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), float(np.median(times)), result


def measure_embedding_throughput(encode_images=None, encode_texts=None) -> None:
    """TODO(model): time encode_images / encode_texts (pairs/s) once the model exists."""
    if encode_images is None or encode_texts is None:
        print("embedding throughput: TODO, not measured (no model yet); hook: measure_embedding_throughput()")
        return
    raise NotImplementedError("wire the model's jitted image/text encoders in here")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5, help="repeats for sizes <= 20k (1 above)")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--naive-max-gib", type=float, default=4.0, help="skip naive runs needing more")
    args = parser.parse_args()

    print(
        "Measures: wall time to compute image->text and text->image retrieval metrics (R@1/5/10, MRR, "
        f"median/mean rank) from precomputed random L2-normalised {args.dim}-d float32 embeddings, "
        "N images x N texts, pair i<->i, CPU. Model embedding time is NOT included."
    )
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, numpy {np.__version__}, "
        f"load average {os.getloadavg()[0]:.2f} at start (other processes skew timings)"
    )
    measure_embedding_throughput()
    for n in args.sizes:
        images, texts = random_pairs(n, args.dim)
        repeats = args.repeats if n <= 20_000 else 1
        ours_min, ours_med, result = time_it(
            lambda: retrieval_metrics(images, texts, chunk_size=args.chunk_size), repeats
        )
        floor_min, floor_med, _ = time_it(lambda: gemm_floor(images, texts, args.chunk_size), repeats)
        print(f"\n== {n:,} pairs, {repeats} repeat(s); peak RSS before naive runs {peak_rss_gib():.2f} GiB")
        print(f"  chunked (ours)   min {ours_min:7.3f} s  median {ours_med:7.3f} s")
        print(
            f"  gemm floor       min {floor_min:7.3f} s  median {floor_med:7.3f} s   "
            f"ours/floor {ours_min / floor_min:.2f}x"
        )
        naive_gib = n * n * (4 + 8) / 2**30  # score matrix + argsort indices
        if naive_gib > args.naive_max_gib:
            print(f"  naive            skipped: needs ~{naive_gib:.0f} GiB for the full matrix")
        else:
            for name, fn in (("naive count", naive_count), ("naive sort", naive_sort)):
                naive_min, naive_med, (i2t, t2i) = time_it(lambda: fn(images, texts), min(repeats, 3))
                differ = int((i2t != result.i2t_ranks).sum() + (t2i != result.t2i_ranks).sum())
                print(
                    f"  {name:<16} min {naive_min:7.3f} s  median {naive_med:7.3f} s   "
                    f"naive/ours {naive_min / ours_min:.2f}x   ranks differ on {differ} of {2 * n} queries"
                )
        print(format_results_table({f"random {n // 1000}k": result}))
        print(f"  peak RSS {peak_rss_gib():.2f} GiB, load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
