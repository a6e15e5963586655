"""Turns ROCO's raw files into JSON lines, or any source into sharded records, reporting what it dropped and why.

    python -m medclip.data.prepare --roco-dir ../shared/roco-sample --output-dir data/roco
    # -> data/roco/{train,validation,test}.jsonl (the splits found) and data/roco/summary.json
    medclip prepare --source data/train.jsonl --output_dir gs://bucket/shards --format shards --shard_size 1024
    # -> train-00000.tfrecord ..., train-metadata.jsonl, manifest.json (medclip.data.shards), summary.json
    medclip prepare --source tfds:roco/radiology --tfds_data_dir ~/tensorflow_datasets --output_dir DIR --format shards
    medclip verify-shards DIR   # reads every shard back: one line per bad one

`--source` is anything the trainer reads (ROCO or ROCOv2 folder, JSON lines, CSV/TSV, a Hugging Face dataset) or a
prepared TFDS dataset (`tfds:NAME[/CONFIG][:VERSION]`, TFDS's spelling, from `--tfds_data_dir`); sharded records are
written for every split asked (default: every ROCO or TFDS split found, else "train"), in an order shuffled once
with `--shuffle_seed`, to a local folder or a bucket. The manifest records each shard's CRC32C; in a bucket the
objects' own CRC32C is compared with it once all are written.

Every image is checked (header, size, end marker) and decoded once with the pipeline's TF decoder, so training
never meets an image it cannot read; `--min-mean-intensity` also drops near-black images. CMYK JPEGs are converted
to RGB and written to `output-dir/converted/{split}/ID.png`. Records are skipped
and counted by reason, or with `--strict` the first bad one stops the run with its file and line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from medclip.data import captions, image_checks
from medclip.data.records import DataError, DropCounter
from medclip.data.sources import jsonl, roco
from medclip.flag_parsing import ArgumentParser, number_in_range


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="medclip prepare", description=__doc__.split("\n\n")[0])  # also --roco-dir etc.
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--roco_dir", help="ROCO checkout (or its data/ folder) as the fetch script leaves it")
    where.add_argument("--source", help="any data the trainer reads (ROCO/ROCOv2 folder, JSON lines, CSV/TSV, "
                                        "Hugging Face dataset; a local path or a bucket URL) or a prepared TFDS "
                                        "dataset, tfds:NAME[/CONFIG][:VERSION]")
    parser.add_argument("--tfds_data_dir", help="--source tfds:...: the TFDS data dir holding it (default TFDS's: "
                                                "$TFDS_DATA_DIR or ~/tensorflow_datasets)")
    parser.add_argument("--output_dir", required=True, help="where the output and summary.json go (or a gs:// URL)")
    parser.add_argument("--format", choices=("jsonl", "shards"), default="jsonl",
                        help="jsonl: ROCO raw -> {split}.jsonl; shards: any source -> TFRecord shards + manifest.json")
    parser.add_argument("--splits", nargs="+",
                        help="default: every ROCO split found (or a prepared folder's), else train")
    parser.add_argument("--shard_size", type=number_in_range(int, 1), default=1024, help="examples per shard")
    parser.add_argument("--shuffle_seed", type=number_in_range(int, 0), default=0,
                        help="shards: the examples are written in an order shuffled with this seed")
    parser.add_argument("--no_shuffle", dest="shuffle", action="store_false", help="shards: keep the source's order")
    parser.add_argument("--image_column", help="CSV/Hugging Face: the image column (default image)")
    parser.add_argument("--caption_column", help="CSV/Hugging Face: the caption column (default caption)")
    parser.add_argument("--no_progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--subsets", nargs="+", choices=roco.SUBSETS, default=["radiology"])
    parser.add_argument("--min_caption_length", type=number_in_range(int, 0), default=captions.DEFAULT_MIN_CAPTION_LENGTH,
                        help="drop captions shorter than this many characters (after cleaning)")
    parser.add_argument("--min_mean_intensity", type=number_in_range(float, 0, 255), default=None,
                        help="drop near-black images: mean intensity (0-255) under this value; off by default")
    parser.add_argument("--max_pixels", type=number_in_range(int, 1), default=image_checks.DEFAULT_MAX_PIXELS,
                        help="drop images declaring more pixels than this (decompression bombs)")
    parser.add_argument("--no_verify_decode", dest="verify_decode", action="store_false",
                        help="skip the full decode check (header checks still run)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    args = parser.parse_args(argv)
    from medclip.data.sources.tfds_source import is_tfds

    args.tfds = is_tfds(args.source)
    if args.tfds_data_dir and not args.tfds:
        parser.error("--tfds_data_dir goes with --source tfds:NAME")
    args.roco = args.roco_dir is not None or (not args.tfds and _is_roco_raw(args.source))
    args.source = args.source or args.roco_dir
    if args.format == "jsonl" and not args.roco:
        parser.error(f"--format jsonl writes ROCO raw folders only; {args.source} is not one: use --format shards")
    if args.roco:
        unknown = sorted(set(args.splits or ()) - set(roco.SPLITS))
        if unknown:
            parser.error(f"--splits: {', '.join(unknown)} is not a ROCO split ({', '.join(roco.SPLITS)})")
    return args


def _is_roco_raw(source: str) -> bool:
    from medclip.storage import as_path

    try:
        return (as_path(source) / "data").is_dir() or as_path(source).name == "data"
    except OSError:
        return False


def prepare(args: argparse.Namespace) -> dict:
    """Writes one JSON lines file per split, or sharded records; returns the summary (also written to
    summary.json)."""
    if args.format == "shards":
        return prepare_shards(args)
    args.roco_dir, args.output_dir = Path(args.source), Path(args.output_dir)
    splits = args.splits or roco.available_splits(args.roco_dir, tuple(args.subsets))
    if not splits:
        raise FileNotFoundError(f"no ROCO split with {', '.join(args.subsets)} under {args.roco_dir}")
    summary = {"roco_dir": str(args.roco_dir), "subsets": list(args.subsets), "splits": {}}
    for split in splits:
        counter = DropCounter(strict=args.strict)
        items = roco.load_roco(
            args.roco_dir, split, tuple(args.subsets), counter=counter,
            min_caption_length=args.min_caption_length, max_pixels=args.max_pixels,
            verify_decode=args.verify_decode, min_mean_intensity=args.min_mean_intensity,
        )
        items = _write_converted_images(items, args.output_dir / "converted" / split)
        path = jsonl.write_jsonl(items, args.output_dir / f"{split}.jsonl")
        print(f"{split}: wrote {path}\n  {counter.report().replace(chr(10), chr(10) + '  ')}")
        summary["splits"][split] = {"jsonl": str(path), **counter.summary()}
    summary["kept"] = sum(s["kept"] for s in summary["splits"].values())
    summary["dropped"] = sum(s["dropped"] for s in summary["splits"].values())
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n",
                                                  encoding="utf-8")
    return summary


def _default_splits(args: argparse.Namespace) -> list[str]:
    from medclip.data.shard_manifest import is_prepared, read_manifest

    if args.roco:
        return list(roco.available_splits(args.source, tuple(args.subsets)))
    if args.tfds:
        from medclip.data.sources import tfds_source

        return tfds_source.split_names(tfds_source.open_builder(args.source, args.tfds_data_dir))
    if is_prepared(args.source):
        return list(read_manifest(args.source)["splits"])
    return ["train"]


def _load(args: argparse.Namespace, split: str, counter: DropCounter) -> list:
    options = dict(counter=counter, min_caption_length=args.min_caption_length, max_pixels=args.max_pixels,
                   verify_decode=args.verify_decode, min_mean_intensity=args.min_mean_intensity)
    if args.roco:
        return roco.load_roco(args.source, split, tuple(args.subsets), **options)
    if args.tfds:
        from medclip.data.sources.tfds_source import load_tfds

        return load_tfds(args.source, split, data_dir=args.tfds_data_dir, image_column=args.image_column,
                         caption_column=args.caption_column, **options)
    from medclip.data.sources.auto import load_records

    return load_records(args.source, split, image_column=args.image_column, caption_column=args.caption_column,
                        **options)


def prepare_shards(args: argparse.Namespace) -> dict:
    """Every split of `--source` as sharded records in `--output_dir` (medclip.data.shards); the manifest is
    written last, so a folder with a manifest is complete. A folder prepared before keeps its other splits (e.g.
    train from one file, then validation from another)."""
    import numpy as np

    from medclip import storage
    from medclip.data import shards
    from medclip.data.shard_manifest import check_files_listed, is_prepared, read_manifest, split_of, write_manifest

    splits = args.splits or _default_splits(args)
    if not splits:
        raise FileNotFoundError(f"no split found in {args.source}")
    summary = {"source": str(args.source), "format": "shards", "splits": {}}
    entries = {}
    if is_prepared(args.output_dir):
        earlier = read_manifest(args.output_dir)["splits"]
        entries = {split: entry for split, entry in earlier.items() if split not in splits}
        if entries:
            print(f"{args.output_dir}: keeping the splits prepared before: {', '.join(entries)}")
    for split in splits:
        counter = DropCounter(strict=args.strict)
        items = _load(args, split, counter)
        if args.shuffle:
            items = [items[i] for i in np.random.default_rng(args.shuffle_seed).permutation(len(items))]
        entries[split] = shards.write_split(items, args.output_dir, split, counter=counter,
                                            shard_size=args.shard_size, progress=args.progress)
        entries[split]["source"] = str(args.source)
        check_files_listed(split_of(str(args.output_dir), split, entries[split]))  # a bucket: its CRC32C too
        print(f"{split}: wrote {len(entries[split]['shards'])} shards, {entries[split]['total']} examples\n  "
              f"{counter.report().replace(chr(10), chr(10) + '  ')}")
        summary["splits"][split] = {"shards": len(entries[split]["shards"]), **counter.summary()}
    summary["manifest"] = write_manifest(args.output_dir, dict(sorted(entries.items())), source=str(args.source),
                                         shuffle_seed=args.shuffle_seed if args.shuffle else None,
                                         shard_size=args.shard_size)
    summary["kept"] = sum(s["kept"] for s in summary["splits"].values())
    summary["dropped"] = sum(s["dropped"] for s in summary["splits"].values())
    storage.write_text(storage.join(args.output_dir, "summary.json"),
                       json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def _write_converted_images(items: list, folder: Path) -> list:
    """Records whose image the checks converted in memory (CMYK JPEGs -> RGB PNG) get it written to
    `folder/ID.png`, so that the JSON lines point at an RGB file."""
    out = []
    for record in items:
        if isinstance(record.image, bytes):
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{record.id}.png"
            path.write_bytes(record.image)
            record = dataclasses.replace(record, image=str(path))
        out.append(record)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = prepare(args)
    except (DataError, OSError) as error:  # OSError: a missing folder, an unreachable bucket (StorageError)
        print(f"medclip prepare: {str(error).strip().splitlines()[0] if str(error).strip() else error!r}",
              file=sys.stderr)
        return 1
    print(f"kept {summary['kept']} records, dropped {summary['dropped']}; summary: "
          f"{os.path.join(str(args.output_dir), 'summary.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
