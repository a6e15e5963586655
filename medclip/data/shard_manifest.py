"""The manifest of a prepared folder of sharded records (`medclip.data.shards`), read without TensorFlow.

`manifest.json` names every shard of every split with its example count and byte size, and each split's metadata
file (one JSON line per example: id, captions, concepts..., in index order). A reader knows the sizes without
scanning the shards, and a missing or truncated shard fails in one line before any training starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from medclip import storage
from medclip.data import records
from medclip.data.records import Record

FORMAT = "medclip-shards"
VERSION = 1
MANIFEST = "manifest.json"


class ShardError(records.DataError):
    """A prepared folder that cannot be read as written: no or foreign manifest, a missing or truncated shard.
    The message is one line naming the file."""


# ------------------------------------------------------------------------------------------------- manifest
def manifest_path(source: str | os.PathLike) -> str:
    text = os.fspath(source)
    return text if text.endswith(MANIFEST) else storage.join(text, MANIFEST)


def is_prepared(source: str | os.PathLike | None) -> bool:
    """A folder holding a shards manifest (or the manifest itself)."""
    if source is None:
        return False
    text = os.fspath(source)
    if text.endswith((".jsonl", ".json", ".csv", ".tsv")) and not text.endswith(MANIFEST):
        return False
    try:
        return storage.as_path(manifest_path(text)).is_file()
    except (OSError, ValueError):
        return False


def read_manifest(source: str | os.PathLike) -> dict:
    path = manifest_path(source)
    try:
        manifest = json.loads(storage.read_bytes(path))
    except (OSError, ValueError) as error:
        raise ShardError(f"{path}: not a readable shards manifest ({storage.first_line(error)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShardError(f"{path}: not a {FORMAT} manifest (format {manifest.get('format')!r}); prepare the data "
                         "with `medclip prepare --format shards`")
    if manifest.get("version") != VERSION:
        raise ShardError(f"{path}: manifest version {manifest.get('version')!r}, this medclip reads version "
                         f"{VERSION}; prepare the data again with this medclip")
    return manifest


@dataclasses.dataclass(frozen=True)
class ShardSplit:
    """One split of a prepared folder, as its manifest describes it (paths are full paths or URLs)."""

    folder: str
    split: str
    paths: tuple[str, ...]
    counts: tuple[int, ...]
    sizes: tuple[int, ...]
    metadata: str
    source: str

    @property
    def total(self) -> int:
        return int(sum(self.counts))

    @property
    def offsets(self) -> np.ndarray:
        """The index of each shard's first example."""
        return np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)


def open_split(source: str | os.PathLike, split: str, *, check_files: bool = True) -> ShardSplit:
    """The split's shards; with `check_files` every shard must exist with the byte size the manifest recorded
    (one listing of the folder), so a missing or truncated shard fails here, before any training."""
    manifest = read_manifest(source)
    folder = os.fspath(source)
    folder = folder[: -len(MANIFEST)].rstrip("/") or "." if folder.endswith(MANIFEST) else folder
    entry = manifest.get("splits", {}).get(split)
    if entry is None:
        raise ShardError(f"{manifest_path(source)}: no split {split!r} (has: {', '.join(manifest.get('splits', {}))})")
    shards = entry["shards"]
    found = ShardSplit(folder=folder, split=split, paths=tuple(storage.join(folder, s["name"]) for s in shards),
                       counts=tuple(int(s["examples"]) for s in shards), sizes=tuple(int(s["bytes"]) for s in shards),
                       metadata=storage.join(folder, entry["metadata"]), source=str(manifest.get("source", "")))
    if found.total != int(entry["total"]):
        raise ShardError(f"{manifest_path(source)}: split {split} counts {found.total} examples in its shards but "
                         f"says total {entry['total']}")
    if check_files:
        _check_files(found)
    return found


def _check_files(split: ShardSplit) -> None:
    sizes = _file_sizes(split.folder)
    for path, expected in zip(split.paths, split.sizes):
        name = path.rsplit("/", 1)[-1]
        if name not in sizes:
            raise ShardError(f"{path}: shard named in the manifest is missing")
        if sizes[name] != expected:
            raise ShardError(f"{path}: {sizes[name]} bytes, the manifest says {expected}: truncated or rewritten "
                             "since it was prepared; prepare the data again")
    if split.metadata.rsplit("/", 1)[-1] not in sizes:
        raise ShardError(f"{split.metadata}: metadata file named in the manifest is missing")


def _file_sizes(folder: str) -> dict[str, int]:
    root = storage.as_path(folder)
    try:
        if isinstance(root, Path):
            return {p.name: p.stat().st_size for p in root.iterdir() if p.is_file()}
        import fsspec

        fs, path = fsspec.core.url_to_fs(folder)
        fs.invalidate_cache(path)
        return {info["name"].rsplit("/", 1)[-1]: int(info["size"]) for info in fs.ls(path, detail=True)
                if info.get("type") == "file"}
    except (OSError, ValueError) as error:
        raise ShardError(f"{folder}: cannot list the shards ({storage.first_line(error)})") from None


def load_metadata(split: ShardSplit) -> list[Record]:
    """Every example's text (ids, captions, concepts...) in index order, without the images: what the trainer
    tokenises. `Record.image` names where the image is ("shard#row"), for messages."""
    items = []
    shard_of = np.repeat(np.arange(len(split.counts)), split.counts)
    offsets = split.offsets
    with storage.open_file(split.metadata, "rb") as f:
        for number, line in enumerate(f):
            data = json.loads(line)
            if data["index"] != number:
                raise ShardError(f"{split.metadata}:{number + 1}: index {data['index']}, expected {number}")
            shard = int(shard_of[number]) if number < len(shard_of) else -1
            where = f"{split.paths[shard]}#{number - offsets[shard]}" if shard >= 0 else "?"
            items.append(Record(id=data["id"], image=where, captions=data["captions"],
                                concepts=data.get("concepts", []), keywords=data.get("keywords", []),
                                semantic_types=data.get("semantic_types", []),
                                concept_names=data.get("concept_names", []), source=data.get("source", ""),
                                fields=data.get("fields", {})))
    if len(items) != split.total:
        raise ShardError(f"{split.metadata}: {len(items)} examples, the manifest says {split.total}")
    return items


def write_manifest(folder: str | os.PathLike, splits: dict[str, dict], *, source: str, shuffle_seed: int | None,
                   shard_size: int) -> str:
    """Written last: a folder is a prepared dataset only once every shard it names is in place."""
    manifest = {"format": FORMAT, "version": VERSION, "source": source, "shuffle_seed": shuffle_seed,
                "shard_size": shard_size, "total": sum(entry["total"] for entry in splits.values()), "splits": splits}
    path = manifest_path(folder)
    storage.write_text(path, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return path
