"""One entry point for every source, chosen from what the path or name is."""

from __future__ import annotations

from pathlib import Path

from medclip.data.records import DropCounter, Record


def load_records(source: str | Path, split: str = "train", *, counter: DropCounter, min_caption_length: int = 10,
                 image_column: str | None = None, caption_column: str | None = None) -> list[Record]:
    """ROCO root folder (has data/<split>/), JSON lines, CSV/TSV, or a Hugging Face dataset (folder or id)."""
    common = dict(counter=counter, min_caption_length=min_caption_length)
    path = Path(source)
    name = str(source)
    if name.endswith((".jsonl", ".json")):
        from medclip.data.sources.jsonl import load_jsonl

        return load_jsonl(path, **common)
    if name.endswith((".csv", ".tsv")):
        from medclip.data.sources.csv_source import load_csv

        return load_csv(path, image_column=image_column or "image", caption_column=caption_column or "caption",
                        delimiter="\t" if name.endswith(".tsv") else ",", **common)
    if (path / "data").is_dir():
        from medclip.data.sources.roco import load_roco

        return load_roco(path, split, **common)
    from medclip.data.sources.hf_datasets import load_hf_dataset

    return load_hf_dataset(name, split=split, image_column=image_column or "image",
                           caption_column=caption_column or "caption", **common)
