"""How far the fast TF resize (`resample="tf_bilinear"`) is from PIL's exact one (`"pil_bicubic"`, what open_clip and
CLIPImageProcessor feed their models), in normalised pixel units (CLIP mean/std), and what each costs per image.

    python benchmarks/resize_paths.py [--images DIR] [--count 8] [--size 224]

Picks `--count` JPEGs of different sizes from the ROCO sample (every len/count-th file by pixel count).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image

from medclip.data.images import eval_image
from medclip.models.preprocess import Preprocess



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=Path("/work/shared/roco-sample/data/test/radiology/images"))
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    files = sorted(args.images.glob("*.jpg"))
    if not files:
        raise SystemExit(f"no JPEGs in {args.images}")
    by_pixels = sorted(files, key=lambda f: Image.open(f).size[0] * Image.open(f).size[1])
    step = max(len(by_pixels) // args.count, 1)
    chosen = by_pixels[::step][:args.count]
    fast, exact = Preprocess(), Preprocess(resample="pil_bicubic")
    rows, times = [], {"tf_bilinear": 0.0, "pil_bicubic": 0.0}
    for path in chosen:
        data = tf.constant(path.read_bytes())
        out = {}
        for name, preprocess in (("tf_bilinear", fast), ("pil_bicubic", exact)):
            eval_image(data, args.size, preprocess)  # warm
            start = time.perf_counter()
            for _ in range(3):
                out[name] = eval_image(data, args.size, preprocess).numpy()
            times[name] += (time.perf_counter() - start) / 3
        diff = np.abs(out["tf_bilinear"] - out["pil_bicubic"])
        with Image.open(path) as image:
            rows.append((path.name, image.mode, image.size, diff.mean(), diff.max()))
    print(f"{'image':<16}{'mode':<6}{'size':<12}{'mean |diff|':>12}{'max |diff|':>12}")
    for name, mode, size, mean, top in rows:
        print(f"{name:<16}{mode:<6}{f'{size[0]}x{size[1]}':<12}{mean:>12.4f}{top:>12.3f}")
    means, tops = np.array([r[3] for r in rows]), np.array([r[4] for r in rows])
    print(f"all {len(rows)}: mean |diff| {means.mean():.4f}, max |diff| {tops.max():.3f} (normalised units)")
    for name, total in times.items():
        print(f"{name}: {1000 * total / len(rows):.1f} ms per image (eager, one thread)")


if __name__ == "__main__":
    main()
