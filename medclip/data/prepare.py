"""Turns ROCO's raw files into JSON lines, reporting what it dropped and why.

    python -m medclip.data.prepare --roco-dir ../shared/roco-sample --output-dir data/roco
    # -> data/roco/{train,validation,test}.jsonl (the splits found) and data/roco/summary.json

Every image is checked (header, size, end marker) and decoded once with the pipeline's TF decoder, so training
never meets an image it cannot read; `--min-mean-intensity` also drops near-black images. CMYK JPEGs are converted
to RGB and written to `output-dir/converted/{split}/ID.png`. Records are skipped
and counted by reason, or with `--strict` the first bad one stops the run with its file and line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from medclip.data import captions, image_checks
from medclip.data.records import DataError, DropCounter
from medclip.data.sources import jsonl, roco
from medclip.flag_parsing import ArgumentParser, number_in_range


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="medclip prepare", description=__doc__.split("\n\n")[0])  # also --roco-dir etc.
    parser.add_argument("--roco_dir", required=True, type=Path,
                        help="ROCO checkout (or its data/ folder) as the fetch script leaves it")
    parser.add_argument("--output_dir", required=True, type=Path, help="where {split}.jsonl and summary.json go")
    parser.add_argument("--splits", nargs="+", choices=roco.SPLITS, help="default: every split found")
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
    return parser.parse_args(argv)


def prepare(args: argparse.Namespace) -> dict:
    """Writes one JSON lines file per split; returns the summary (also written to summary.json)."""
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
    except (DataError, FileNotFoundError) as error:
        print(f"medclip prepare: {error}", file=sys.stderr)
        return 1
    print(f"kept {summary['kept']} records, dropped {summary['dropped']}; summary: {args.output_dir / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
