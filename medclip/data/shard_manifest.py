"""The manifest of a prepared folder of sharded records (`medclip.data.shards`), read without TensorFlow.

`manifest.json` names every shard of every split with its example count, byte size and CRC32C, and each split's
metadata file (one JSON line per example: id, captions, concepts..., in index order). A reader knows the sizes
without scanning the shards, and a missing or truncated shard fails in one line before any training starts; in a
bucket the object's own CRC32C (in the same listing, no read) catches a shard of the right size whose bytes changed.
Locally that costs a full read, so start-up compares sizes only and TensorFlow's per-record CRCs catch the rest
while streaming; `medclip verify-shards` reads every shard. Manifests written before the CRC32C was recorded
load as before (sizes only).
"""

from __future__ import annotations

import base64
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


VERIFY_COMMAND = "medclip verify-shards"


class CorruptShardError(ShardError):
    """A shard whose bytes are not those written (a flipped byte, a truncated-then-padded upload), found while
    reading it: names the shard, the record (its row in the shard, from 0) and the command that checks them all."""

    def __init__(self, path: str, row: int, reason: str):
        self.path, self.row, self.reason = path, row, reason
        folder = path.rsplit("/", 1)[0] if "/" in path else "."
        super().__init__(f"{path}: record {row} is corrupt ({reason}); run `{VERIFY_COMMAND} {folder}` to check "
                         "every shard, then prepare the data again")

    def __reduce__(self):
        return type(self), (self.path, self.row, self.reason)


# ------------------------------------------------------------------------------------------------- manifest
def manifest_path(source: str | os.PathLike) -> str:
    text = os.fspath(source)
    return text if text.endswith(MANIFEST) else storage.join(text, MANIFEST)


def folder_of(source: str | os.PathLike) -> str:
    """The prepared folder, given it or its manifest."""
    text = os.fspath(source)
    return text[: -len(MANIFEST)].rstrip("/") or "." if text.endswith(MANIFEST) else text


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
    checksums: tuple[str | None, ...] = ()  # each shard's CRC32C (8 hex digits); None where the manifest has none

    @property
    def total(self) -> int:
        return int(sum(self.counts))

    @property
    def offsets(self) -> np.ndarray:
        """The index of each shard's first example."""
        return np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)


def open_split(source: str | os.PathLike, split: str, *, check_files: bool = True) -> ShardSplit:
    """The split's shards; with `check_files` every shard must exist with the byte size (in a bucket, the CRC32C)
    the manifest recorded (one listing of the folder), so a missing, truncated or, in a bucket, changed shard fails
    here, before any training."""
    manifest = read_manifest(source)
    folder = folder_of(source)
    entry = manifest.get("splits", {}).get(split)
    if entry is None:
        raise ShardError(f"{manifest_path(source)}: no split {split!r} (has: {', '.join(manifest.get('splits', {}))})")
    found = split_of(folder, split, entry, source=str(manifest.get("source", "")))
    if found.total != int(entry["total"]):
        raise ShardError(f"{manifest_path(source)}: split {split} counts {found.total} examples in its shards but "
                         f"says total {entry['total']}")
    if check_files:
        check_files_listed(found)
    return found


def split_of(folder: str, split: str, entry: dict, *, source: str = "") -> ShardSplit:
    """A split as its manifest entry describes it."""
    shards = entry["shards"]
    return ShardSplit(folder=folder, split=split, paths=tuple(storage.join(folder, s["name"]) for s in shards),
                      counts=tuple(int(s["examples"]) for s in shards), sizes=tuple(int(s["bytes"]) for s in shards),
                      metadata=storage.join(folder, entry["metadata"]), source=source,
                      checksums=tuple(s.get("crc32c") for s in shards))


def check_files_listed(split: ShardSplit) -> None:
    """What one listing of the folder can tell: every shard is there with its byte size and, in a bucket that
    lists each object's CRC32C, with the bytes written."""
    listed = list_files(split.folder)
    for path, expected, checksum in zip(split.paths, split.sizes, split.checksums or (None,) * len(split.paths)):
        name = path.rsplit("/", 1)[-1]
        if name not in listed:
            raise ShardError(f"{path}: shard named in the manifest is missing")
        size, listed_checksum = listed[name]
        if size != expected:
            raise ShardError(f"{path}: {size} bytes, the manifest says {expected}: truncated or rewritten "
                             "since it was prepared; prepare the data again")
        if checksum and listed_checksum and listed_checksum != checksum:
            raise ShardError(f"{path}: CRC32C {listed_checksum} in the bucket, the manifest says {checksum}: the "
                             f"object is not the shard prepared (a corrupted or partial upload); run "
                             f"`{VERIFY_COMMAND} {split.folder}`, then prepare the data again")
    if split.metadata.rsplit("/", 1)[-1] not in listed:
        raise ShardError(f"{split.metadata}: metadata file named in the manifest is missing")


def list_files(folder: str) -> dict[str, tuple[int, str | None]]:
    """name -> (bytes, CRC32C as 8 hex digits or None) of the folder's files: a bucket lists each object's CRC32C
    with its size (GCS does; other stores may not), a local folder only sizes."""
    root = storage.as_path(folder)
    try:
        if isinstance(root, Path):
            return {p.name: (p.stat().st_size, None) for p in root.iterdir() if p.is_file()}
        import fsspec

        fs, path = fsspec.core.url_to_fs(folder)
        fs.invalidate_cache(path)
        return {info["name"].rsplit("/", 1)[-1]: (int(info["size"]),
                                                  gcs_crc32c_hex(info["crc32c"]) if info.get("crc32c") else None)
                for info in fs.ls(path, detail=True) if info.get("type") == "file"}
    except (OSError, ValueError) as error:
        raise ShardError(f"{folder}: cannot list the shards ({storage.first_line(error)})") from None


def gcs_crc32c_hex(metadata_value: str) -> str:
    """An object's `crc32c` as GCS lists it (base64 of 4 big-endian bytes) in the manifest's spelling."""
    return base64.b64decode(metadata_value).hex()


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
