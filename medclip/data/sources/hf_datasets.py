"""Hugging Face `datasets` with an image column and a caption column.

`name_or_path` may be a folder written by `Dataset.save_to_disk`, a parquet file or a folder of them, any other
local folder `datasets.load_dataset` understands (e.g. an imagefolder with metadata), or a hub id when online.
Images are never decoded here: an `Image` column is read with `decode=False` and yields its bytes (or path).
"""

from __future__ import annotations

from typing import Any

from pathlib import Path

from medclip.data import captions as caption_cleaning
from medclip.data import records
from medclip.data.records import DropCounter, Record
from medclip.data.sources import base


def open_dataset(name_or_path: str | Path, split: str = "train"):
    """A `datasets.Dataset` for one split, from disk (saved dataset, parquet, data folder) or the hub."""
    import datasets

    path = Path(name_or_path)
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        return datasets.load_from_disk(str(path))[split]
    if path.is_dir() and (path / "state.json").is_file():
        return datasets.load_from_disk(str(path))
    if path.is_file() and path.suffix == ".parquet":
        return datasets.load_dataset("parquet", data_files=str(path), split="train")  # one file is one split
    if path.is_dir() and sorted(path.glob("*.parquet")):
        return datasets.load_dataset("parquet", data_files=sorted(map(str, path.glob("*.parquet"))), split="train")
    return datasets.load_dataset(str(name_or_path), split=split)


def _image_value(value, where: str, counter: DropCounter) -> str | bytes | None:
    if isinstance(value, dict):  # an Image feature read with decode=False: {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, (bytes, str)) and value:
        return value
    counter.drop(records.MISSING_FILE, where, "no image bytes or path in the row")
    return None


def read_dataset(
    dataset,
    counter: DropCounter,
    *,
    name: str,
    image_column: str = "image",
    caption_column: str = "caption",
    id_column: str | None = None,
    concepts_column: str | None = None,
    min_caption_length: int = caption_cleaning.DEFAULT_MIN_CAPTION_LENGTH,
) -> list[Record]:
    """Records from a `datasets.Dataset`; `name` is used in messages ("name:row")."""
    import datasets

    for column in (image_column, caption_column, id_column, concepts_column):
        if column and column not in dataset.column_names:
            raise KeyError(f"{name} has no column {column!r}; its columns are {dataset.column_names}")
    if isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    columns = [c for c in (image_column, caption_column, id_column, concepts_column) if c]
    items = []
    row_number = 0
    for batch in dataset.select_columns(columns).iter(batch_size=1000):
        for i in range(len(batch[image_column])):
            where = f"{name}:{row_number}"
            row_number += 1
            raw_captions = batch[caption_column][i]
            if isinstance(raw_captions, str):
                raw_captions = [raw_captions]
            if not isinstance(raw_captions, list) or not all(isinstance(c, str) for c in raw_captions):
                counter.drop(records.MALFORMED_LINE, where, f"{caption_column!r} is not a string or list of strings")
                continue
            cleaned = caption_cleaning.clean_captions(raw_captions, where, counter, min_caption_length)
            if cleaned is None:
                continue
            image = _image_value(batch[image_column][i], where, counter)
            if image is None:
                continue
            concepts = batch[concepts_column][i] if concepts_column else []
            if isinstance(concepts, str):
                concepts = [c.strip() for c in concepts.split(";") if c.strip()]
            items.append(Record(
                id=str(batch[id_column][i]) if id_column else str(row_number - 1),
                image=image,
                captions=cleaned,
                concepts=list(concepts or []),
                source=where,
            ))
    return items


def load_hf_dataset(
    name_or_path: str | Path,
    *,
    split: str = "train",
    image_column: str = "image",
    caption_column: str = "caption",
    id_column: str | None = None,
    concepts_column: str | None = None,
    counter: DropCounter | None = None,
    **options: Any,
) -> list[Record]:
    """Loads one split of a Hugging Face dataset. Drops are counted in `counter` (new and logged if None);
    `options` are `base.LoadOptions`."""
    dataset = open_dataset(name_or_path, split)
    name = f"{name_or_path}[{split}]"

    def read(counter: DropCounter, min_caption_length: int) -> list[Record]:
        return read_dataset(dataset, counter, name=name, image_column=image_column, caption_column=caption_column,
                            id_column=id_column, concepts_column=concepts_column,
                            min_caption_length=min_caption_length)

    return base.load(name, read, counter, options)
