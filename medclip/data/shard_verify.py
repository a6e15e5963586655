"""`medclip verify-shards DIR`: reads every shard of a prepared folder and names, in one line each, those that are
not as written.

Start-up checks what one listing tells (every shard there with its size; in a bucket, its CRC32C too). A flipped
byte in a local shard, or in a store whose listing has no checksums, shows only when its bytes are read: training
stops there with one line naming the record. This reads them all up front, so one run lists every bad shard:
each record's own CRCs (TFRecord framing), the record count and the whole file's CRC32C against the manifest, and
the split's metadata file. A manifest written before the CRC32C was recorded still verifies by the records' CRCs
and counts, and says so.
"""

from __future__ import annotations

import dataclasses
import os

from medclip import storage
from medclip.data.record_frames import read_records
from medclip.data.shard_manifest import (CorruptShardError, ShardError, ShardSplit, folder_of, list_files,
                                         load_metadata, manifest_path, read_manifest, split_of)

_FRAME_BYTES = 16  # a record's header and footer


@dataclasses.dataclass
class Verification:
    lines: list[str]  # what to print: notes, then one line per bad file, then the summary
    bad: list[str]  # the bad files' paths
    shards: int


def verify_shard(path: str, examples: int, checksum: str | None, advance=lambda n: None) -> str | None:
    """What is wrong with one shard, in a few words, or None. `advance(n)` is told of every n bytes read."""
    crc, rows = [0], 0
    try:
        with storage.open_sequential(path) as f:
            for data in read_records(f, path, crc=crc):
                rows += 1
                advance(len(data) + _FRAME_BYTES)
    except CorruptShardError as error:
        return f"record {error.row}: {error.reason}"
    except OSError as error:
        return f"cannot be read ({storage.first_line(error)})"
    if rows != examples:
        return f"{rows} records, the manifest says {examples}"
    if checksum and f"{crc[0]:08x}" != checksum:
        return f"CRC32C {crc[0]:08x}, the manifest says {checksum}"
    return None


def verify_folder(folder: str | os.PathLike, splits: list[str] | None = None, *, progress: bool = True
                  ) -> Verification:
    """Every shard of `splits` (default: all) of a prepared folder, read once; raises `ShardError` only when the
    folder is not a prepared one (no or foreign manifest, an unknown split)."""
    from tqdm import tqdm

    manifest = read_manifest(folder)
    folder = folder_of(folder)
    entries = manifest.get("splits", {})
    unknown = [name for name in splits or () if name not in entries]
    if unknown:
        raise ShardError(f"{manifest_path(folder)}: no split {', '.join(map(repr, unknown))} (has: "
                         f"{', '.join(entries)})")
    chosen = [split_of(folder, name, entries[name]) for name in splits or entries]
    lines, bad = [], []
    unchecked = sum(checksum is None for split in chosen for checksum in split.checksums)
    if unchecked:
        lines.append(f"note: {manifest_path(folder)} records no CRC32C for {unchecked} shards (prepared by an older "
                     "medclip): their records' own CRCs and counts are checked, not the whole files")
    listed = list_files(folder)
    total = sum(sum(split.sizes) for split in chosen)
    with tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=not progress) as bar:
        for split in chosen:
            for path, problem in _split_problems(split, listed, bar.update):
                bad.append(path)
                lines.append(f"BAD {path}: {problem}")
    shards = sum(len(split.paths) for split in chosen)
    names = ", ".join(split.split for split in chosen)
    if bad:
        lines.append(f"{folder}: {len(bad)} bad file(s) in {names} ({shards} shards); prepare the data again "
                     "(`medclip prepare ... --format shards`)")
    else:
        examples = sum(split.total for split in chosen)
        lines.append(f"{folder}: all {shards} shards of {names} intact ({examples} examples, {total} bytes)")
    return Verification(lines=lines, bad=bad, shards=shards)


def _split_problems(split: ShardSplit, listed: dict[str, tuple[int, str | None]], advance):
    for path, examples, size, checksum in zip(split.paths, split.counts, split.sizes, split.checksums):
        name = path.rsplit("/", 1)[-1]
        if name not in listed:
            advance(size)
            yield path, "missing"
            continue
        read = [0]

        def count(n: int) -> None:
            read[0] += n
            advance(n)

        problem = verify_shard(path, examples, checksum, count)
        advance(max(size - read[0], 0))
        if problem is None and listed[name][0] != size:
            problem = f"{listed[name][0]} bytes, the manifest says {size}"
        if problem is not None:
            yield path, problem
    try:
        load_metadata(split)
    except ShardError as error:
        message = str(error)
        yield split.metadata, message[len(split.metadata) + 2:] if message.startswith(split.metadata) else message
    except (OSError, ValueError, KeyError) as error:
        yield split.metadata, f"cannot be read ({storage.first_line(error)})"
