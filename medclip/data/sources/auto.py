"""One entry point for every source, chosen from what the path or name is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medclip.data.records import DropCounter, Record
from medclip.data.shard_manifest import is_prepared
from medclip.storage import as_path, check_readable


def load_records(source: str | Path, split: str = "train", *, counter: DropCounter, min_caption_length: int = 10,
                 image_column: str | None = None, caption_column: str | None = None,
                 delimiter: str | None = None, prepared: bool | None = None, **options: Any) -> list[Record]:
    """A prepared folder of sharded records (has manifest.json), ROCO root folder (has data/<split>/), ROCOv2
    root (has {train,valid,test}_captions.csv) or one ROCOv2 `<split>_captions.csv`, JSON lines, CSV/TSV, or a
    Hugging Face dataset (folder or id). `options` are `medclip.data.sources.base.LoadOptions`
    (min_mean_intensity, text_cleaning, ...). `delimiter`: a CSV/TSV file's field delimiter (default: tab for
    .tsv, comma for .csv). `prepared`: whether `source` is a prepared folder, when the caller has asked already
    (on a bucket each question is a request)."""
    check_readable(source, "data")  # a bucket URL that is not there: one StorageError naming it
    if is_prepared(source) if prepared is None else prepared:  # `medclip prepare --format shards`: the whole split
        from medclip.data.shards import load_shards

        return load_shards(source, split, counter=counter)
    common = dict(counter=counter, min_caption_length=min_caption_length, **options)
    path = as_path(source)
    name = str(source)
    if name.endswith((".jsonl", ".json")):
        from medclip.data.sources.jsonl import load_jsonl

        return load_jsonl(path, **common)
    if name.endswith((".csv", ".tsv")):
        from medclip.data.sources import csv_source

        if image_column is None and caption_column is None and csv_source.is_rocov2_captions(path):
            return csv_source.load_rocov2_file(path, **common)
        return csv_source.load_csv(path, image_column=image_column or "image",
                                   caption_column=caption_column or "caption",
                                   delimiter=delimiter or ("\t" if name.endswith(".tsv") else ","), **common)
    if (path / "data").is_dir():
        from medclip.data.sources.roco import load_roco

        return load_roco(path, split, **common)
    if path.is_dir():
        from medclip.data.sources import csv_source

        if csv_source.is_rocov2_root(path):
            return csv_source.load_rocov2(path, split, **common)
    from medclip.data.sources.hf_datasets import load_hf_dataset

    return load_hf_dataset(name, split=split, image_column=image_column or "image",
                           caption_column=caption_column or "caption", **common)
