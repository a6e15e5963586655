"""CSV files with configurable image and caption columns, and ROCOv2 (`{split}_captions.csv` with `ID,Caption`,
`{split}_concepts.csv` with `ID,CUIs` separated by ";", `cui_mapping.csv` with `CUI,Canonical name`, images in
one of the layouts of `ROCOV2_IMAGE_LAYOUTS`)."""

from __future__ import annotations

from typing import Any

import csv
import io
import logging
from pathlib import Path

from medclip.data import captions as caption_cleaning
from medclip.data import records
from medclip.data.records import DropCounter, Record
from medclip.data.sources import base
from medclip.storage import as_path, is_url, open_file

log = logging.getLogger(__name__)


def _rows(path: Path, counter: DropCounter | None, delimiter: str):
    """(line number, row dict) per data row. Fields with bytes that are not UTF-8 drop the row (`invalid_utf8`)."""
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    reader = csv.DictReader(io.StringIO(text.removeprefix("\ufeff"), newline=""), delimiter=delimiter)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            if counter is not None:
                counter.drop(records.MALFORMED_LINE, f"{path}:{reader.line_num}", str(error))
            continue
        where = f"{path}:{reader.line_num}"
        bad = [key for key, value in row.items() if isinstance(value, str) and _has_surrogates(value)]
        if bad:
            if counter is not None:
                counter.drop(records.INVALID_UTF8, where, f"column {bad[0]!r} is not valid UTF-8")
            continue
        yield where, row


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def read_concepts(path: str | Path, id_column: str = "ID", concepts_column: str = "CUIs",
                  separator: str = ";", delimiter: str = ",") -> dict[str, list[str]]:
    """id -> concepts from a concepts CSV (ROCOv2: `ID,CUIs` with CUIs joined by ";")."""
    table = {}
    for _, row in _rows(as_path(path), None, delimiter):
        value = row.get(concepts_column) or ""
        table[(row.get(id_column) or "").strip()] = [c.strip() for c in value.split(separator) if c.strip()]
    return table


def read_csv(
    path: str | Path,
    counter: DropCounter,
    *,
    image_column: str,
    caption_column: str,
    id_column: str | None = None,
    image_dir: str | Path | None = None,
    image_suffix: str = "",
    concepts: dict[str, list[str]] | None = None,
    delimiter: str = ",",
    min_caption_length: int = caption_cleaning.DEFAULT_MIN_CAPTION_LENGTH,
) -> list[Record]:
    """Parses a CSV file. The image is `image_dir / (row[image_column] + image_suffix)`; `image_dir` defaults to
    the CSV's folder. The id is `row[id_column]`, or the image column's value."""
    path = as_path(path)
    image_dir = as_path(image_dir) if image_dir is not None else path.parent
    concepts = concepts or {}
    items = []
    for where, row in _rows(path, counter, delimiter):
        missing = [column for column in (image_column, caption_column, id_column) if column and row.get(column) is None]
        if missing:
            counter.drop(records.MALFORMED_LINE, where, f"no value for column {missing[0]!r}")
            continue
        image_name = row[image_column].strip()
        if not image_name:
            counter.drop(records.MALFORMED_LINE, where, f"empty {image_column!r}")
            continue
        cleaned = caption_cleaning.clean_captions([row[caption_column]], where, counter, min_caption_length)
        if cleaned is None:
            continue
        record_id = row[id_column].strip() if id_column else image_name
        image = Path(image_name + image_suffix)
        items.append(Record(
            id=record_id,
            image=(image_name + image_suffix if is_url(image_name) else
                   str(image if image.is_absolute() else image_dir / image)),
            captions=cleaned,
            concepts=concepts.get(record_id, []),
            source=where,
            fields={k: v for k, v in row.items() if isinstance(k, str) and isinstance(v, str)},
        ))
    return items


def load_csv(
    path: str | Path,
    *,
    image_column: str = "image",
    caption_column: str = "caption",
    id_column: str | None = None,
    image_dir: str | Path | None = None,
    image_suffix: str = "",
    concepts_path: str | Path | None = None,
    concepts_column: str = "CUIs",
    concepts_separator: str = ";",
    delimiter: str = ",",
    counter: DropCounter | None = None,
    **options: Any,
) -> list[Record]:
    """Loads any image-caption CSV. Drops are counted in `counter` (a new one, logged at the end, if None);
    `options` are `base.LoadOptions`."""
    concepts = None
    if concepts_path is not None:
        concepts = read_concepts(concepts_path, id_column or image_column, concepts_column, concepts_separator,
                                 delimiter)

    def read(counter: DropCounter, min_caption_length: int) -> list[Record]:
        return read_csv(path, counter, image_column=image_column, caption_column=caption_column,
                        id_column=id_column, image_dir=image_dir, image_suffix=image_suffix, concepts=concepts,
                        delimiter=delimiter, min_caption_length=min_caption_length)

    return base.load(str(path), read, counter, options)


ROCOV2_SPLITS = {"train": "train", "validation": "valid", "valid": "valid", "test": "test"}


def rocov2_split_name(root: str | Path, split: str) -> str:
    """ROCOv2's name of a split: "validation" is "valid" there (ROCO's raw layout says "validation")."""
    name = ROCOV2_SPLITS.get(split, split)
    return split if (as_path(root) / f"{split}_captions.csv").is_file() else name


def is_rocov2_root(path: str | Path) -> bool:
    """A folder holding ROCOv2's `{train,valid,test}_captions.csv`."""
    return any((as_path(path) / f"{name}_captions.csv").is_file() for name in ("train", "valid", "test"))


def is_rocov2_captions(path: str | Path) -> bool:
    """A `<split>_captions.csv` whose header has ROCOv2's `ID` and `Caption` columns."""
    path = as_path(path)
    if not (path.name.endswith("_captions.csv") and path.is_file()):
        return False
    with open_file(path, "r", encoding="utf-8-sig", errors="replace") as f:
        header = next(csv.reader([f.readline()]), [])
    return {"ID", "Caption"} <= {column.strip() for column in header}


# Where a split's images lie, tried in this order. The release (Zenodo) ships `{split}_images.zip` holding a
# `{split}/` folder: unzipped in the root it leaves `{split}/ID.jpg`. Kaggle unpacks each archive into a folder
# named after it, one level deeper: `{split}_images/{split}/ID.jpg`. Re-packed copies put the files straight
# into `{split}_images/`, or under `images/`.
ROCOV2_IMAGE_LAYOUTS = (
    ("release", "{split}"),
    ("kaggle", "{split}_images/{split}"),
    ("flat archive", "{split}_images"),
    ("images/split", "images/{split}"),
    ("images", "images"),
)


def rocov2_image_dir(root: Path, split: str, probe_id: str | None = None) -> tuple[Path, str]:
    """(folder, layout name) of a split's images: the first layout whose folder holds `probe_id`.jpg (a record
    of the split), else the first whose folder exists; ("release" layout, missing) when none does, so that the
    images are counted as missing files rather than read from a wrong folder."""
    root = Path(root)
    folders = [(name, root / pattern.format(split=split)) for name, pattern in ROCOV2_IMAGE_LAYOUTS]
    existing = [(name, folder) for name, folder in folders if folder.is_dir()]
    if probe_id is not None:
        for name, folder in existing:
            if (folder / f"{probe_id}.jpg").is_file():
                return folder, name
    if existing:
        return existing[0][1], existing[0][0]
    return folders[0][1], folders[0][0]


def _first_id(captions_path: Path) -> str | None:
    for _, row in _rows(captions_path, None, ","):
        if (row.get("ID") or "").strip():
            return row["ID"].strip()
    return None


def load_rocov2(root: str | Path, split: str = "train", **kwargs) -> list[Record]:
    """ROCOv2: `root/{split}_captions.csv` (ID,Caption), `root/{split}_concepts.csv` (ID,CUIs) when present,
    images in whichever of `ROCOV2_IMAGE_LAYOUTS` holds them (logged). `split` may be ROCO's "validation" (ROCOv2's "valid"). Other keyword arguments
    go to `load_csv`."""
    root = as_path(root)
    split = rocov2_split_name(root, split)
    captions_path = root / f"{split}_captions.csv"
    if not captions_path.is_file():
        raise FileNotFoundError(f"no ROCOv2 {captions_path.name} in {root} (ROCOv2 ships train_captions.csv, "
                                "valid_captions.csv and test_captions.csv with their image folders train/ valid/ test/)")
    concepts_path = root / f"{split}_concepts.csv"
    image_dir, layout = rocov2_image_dir(root, split, _first_id(captions_path))
    found = "found" if image_dir.is_dir() else "missing"
    log.info("ROCOv2 %s: images in %s (%s layout, %s)", split, image_dir, layout, found)
    if not image_dir.is_dir():
        tried = ", ".join(pattern.format(split=split) + "/" for _, pattern in ROCOV2_IMAGE_LAYOUTS)
        log.warning("ROCOv2 %s: no image folder under %s (tried %s)", split, root, tried)
    return load_csv(
        captions_path,
        image_column="ID",
        caption_column="Caption",
        id_column="ID",
        image_dir=image_dir,
        image_suffix=".jpg",
        concepts_path=concepts_path if concepts_path.is_file() else None,
        **kwargs,
    )


def load_rocov2_file(captions_path: str | Path, **kwargs) -> list[Record]:
    """One ROCOv2 `<split>_captions.csv`: its images and concepts CSV are found beside it."""
    captions_path = as_path(captions_path)
    return load_rocov2(captions_path.parent, captions_path.name.removesuffix("_captions.csv"), **kwargs)
