"""JSON lines, one record per line: `{"image_path": ..., "captions": [...]}` (the original medclip format).

Optional fields: "id" (defaults to the image path), "concepts", "keywords", "semantic_types"; "caption" (a string) is accepted for
"captions". Captions written as `b'...'` by the original preprocessing are unwrapped. A relative `image_path` is
resolved against `base_dir`, by default the folder holding the JSON lines file.
"""

from __future__ import annotations

from typing import Any

import json
from pathlib import Path

from medclip.data import captions as caption_cleaning
from medclip.data import records
from medclip.data.records import DropCounter, Record
from medclip.data.sources import base
from medclip.storage import as_path, is_url


def _parse(obj, where: str, resolve, counter: DropCounter, min_caption_length: int) -> Record | None:
    if not isinstance(obj, dict):
        counter.drop(records.MALFORMED_LINE, where, f"expected a JSON object, got {type(obj).__name__}")
        return None
    image_path = obj.get("image_path")
    raw_captions = obj.get("captions", obj.get("caption"))
    if isinstance(raw_captions, str):
        raw_captions = [raw_captions]
    if not isinstance(image_path, str) or not image_path.strip():
        counter.drop(records.MALFORMED_LINE, where, 'no "image_path" string')
        return None
    if raw_captions is None or not all(isinstance(caption, str) for caption in raw_captions):
        counter.drop(records.MALFORMED_LINE, where, '"captions" must be a list of strings')
        return None
    cleaned = caption_cleaning.clean_captions(raw_captions, where, counter, min_caption_length)
    if cleaned is None:
        return None
    image = resolve(image_path)
    return Record(
        id=str(obj.get("id") or image_path),
        image=image,
        captions=cleaned,
        concepts=[str(c) for c in obj.get("concepts") or []],
        keywords=[str(k) for k in obj.get("keywords") or []],
        semantic_types=[str(t) for t in obj.get("semantic_types") or []],
        source=where,
        fields={k: v for k, v in obj.items() if isinstance(v, str)},
    )


def read_jsonl(
    path: str | Path,
    counter: DropCounter,
    base_dir: str | Path | None = None,
    min_caption_length: int = caption_cleaning.DEFAULT_MIN_CAPTION_LENGTH,
) -> list[Record]:
    """Parses the file; lines that are not UTF-8, not JSON or not a record are counted and skipped."""
    path = as_path(path)
    base_dir = as_path(base_dir) if base_dir is not None else path.parent

    def resolve(image_path: str) -> str:
        if is_url(image_path):
            return image_path
        image_path = Path(image_path)
        return str(image_path if image_path.is_absolute() else base_dir / image_path)

    items = []
    for number, line in base.read_lines(path, counter):
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as error:
            counter.drop(records.MALFORMED_JSON, where, str(error))
            continue
        record = _parse(obj, where, resolve, counter, min_caption_length)
        if record is not None:
            items.append(record)
    return items


def load_jsonl(
    path: str | Path,
    *,
    base_dir: str | Path | None = None,
    counter: DropCounter | None = None,
    **options: Any,
) -> list[Record]:
    """Loads a JSON lines file. Drops are counted in `counter` (a new one, logged at the end, if None);
    `options` are `base.LoadOptions`."""
    return base.load(str(path), lambda counter, min_length: read_jsonl(path, counter, base_dir, min_length),
                     counter, options)


def write_jsonl(items: list[Record], path: str | Path, relative_paths: bool = True) -> Path:
    """Writes records as JSON lines; image paths relative to the file's folder when `relative_paths` and possible."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    relative_to = path.parent if relative_paths else None
    with open(path, "w", encoding="utf-8") as f:
        for record in items:
            f.write(json.dumps(record.to_json(relative_to), ensure_ascii=False) + "\n")
    return path
