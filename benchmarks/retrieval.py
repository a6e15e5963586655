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


def _embedding_config(name: str, vocab_size: int):
    from medclip.models import BertConfig, CLIPVisionConfig, HybridCLIPConfig
    from medclip.training.model_setup import demo_config

    if name == "demo":
        return demo_config(vocab_size, 64, 32)
    if name == "base":  # ViT-B/32 at 224 px + BERT-base, random weights (the recipe's sizes)
        return HybridCLIPConfig(vision_config=CLIPVisionConfig(), text_config=BertConfig(vocab_size=30522),
                                projection_dim=512)
    raise SystemExit(f"unknown --embed-config {name!r}: demo or base")


def measure_embedding_throughput(config_name: str, n: int, batch_size: int) -> None:
    """Images/s and texts/s of medclip's jitted Embedder against transformers' PyTorch dual encoder with the
    same weights (saved once, loaded by both), same batch size, same inputs, 2 threads, warm-up excluded."""
    import tempfile

    from flax import nnx

    from medclip import FlaxHybridCLIP
    from medclip.data.synthetic import write_synthetic_tokenizer
    from medclip.inference.embedder import Embedder

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_synthetic_tokenizer(f"{tmp}/tok")
        config = _embedding_config(config_name, len(tokenizer))
        FlaxHybridCLIP(config, rngs=nnx.Rngs(0)).save_pretrained(f"{tmp}/model", tokenizer=tokenizer)
        embedder = Embedder(f"{tmp}/model", batch_size=batch_size, max_seq_length=32)
        size = config.vision_config.image_size
        pixels = np.random.default_rng(0).normal(size=(n, size, size, 3)).astype(np.float32)
        texts = [f"Axial CT of the chest showing a mass in the left upper lobe, case {i}." for i in range(n)]
        embedder.embed_pixels(pixels[:batch_size]), embedder.embed_texts(texts[:batch_size])  # compile
        ours_img, _, ours_embeds = time_it(lambda: embedder.embed_pixels(pixels), 3)
        ours_txt, _, _ = time_it(lambda: embedder.embed_texts(texts), 3)
        print(f"\n== embedding throughput, {config_name} config, {n} images / {n} texts, batch {batch_size}")
        print(f"  medclip (jax jit)   images {n / ours_img:8.1f}/s   texts {n / ours_txt:8.1f}/s")
        try:
            import torch
            from transformers import VisionTextDualEncoderModel
        except ImportError:
            print("  PyTorch peer skipped: install the parity extra (torch==2.13.0)")
            return
        torch.set_num_threads(os.cpu_count() or 1)
        peer = VisionTextDualEncoderModel.from_pretrained(f"{tmp}/model").eval()
        nchw = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
        encoded = tokenizer(texts, padding="longest", truncation=True, max_length=32, return_tensors="pt")

        def torch_images():
            with torch.no_grad():
                return torch.cat([peer.get_image_features(pixel_values=nchw[i:i + batch_size]).pooler_output
                                  for i in range(0, n, batch_size)])  # transformers 5: projected pooler_output

        def torch_texts():
            with torch.no_grad():
                return torch.cat([peer.get_text_features(input_ids=encoded["input_ids"][i:i + batch_size],
                                                         attention_mask=encoded["attention_mask"][i:i + batch_size]
                                                         ).pooler_output
                                  for i in range(0, n, batch_size)])

        torch_images(), torch_texts()  # warm-up
        peer_img, _, peer_embeds = time_it(torch_images, 3)
        peer_txt, _, _ = time_it(torch_texts, 3)
        peer_unit = peer_embeds.numpy() / np.linalg.norm(peer_embeds.numpy(), axis=1, keepdims=True)
        print(f"  transformers torch  images {n / peer_img:8.1f}/s   texts {n / peer_txt:8.1f}/s")
        print(f"  ours/peer           images {peer_img / ours_img:8.2f}x   texts {peer_txt / ours_txt:8.2f}x   "
              f"(max |embedding difference| {np.abs(ours_embeds - peer_unit).max():.1e})")


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
    parser.add_argument("--embed-config", default="demo", help="demo or base (ViT-B/32 + BERT-base); none to skip")
    parser.add_argument("--embed-n", type=int, default=256, help="images and texts to embed")
    parser.add_argument("--embed-batch", type=int, default=32)
    args = parser.parse_args()

    print(
        "Measures: wall time to compute image->text and text->image retrieval metrics (R@1/5/10, MRR, "
        f"median/mean rank) from precomputed random L2-normalised {args.dim}-d float32 embeddings, "
        "N images x N texts, pair i<->i, CPU; and, first, embedding throughput against transformers' PyTorch "
        "dual encoder."
    )
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, numpy {np.__version__}, "
        f"load average {os.getloadavg()[0]:.2f} at start (other processes skew timings)"
    )
    if args.embed_config != "none":
        measure_embedding_throughput(args.embed_config, args.embed_n, args.embed_batch)
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
