"""TFRecord framing read in Python with both of its CRCs checked, and the CRC32C helpers of the shard checksums.

A TFRecord file is a run of frames: uint64 length, uint32 masked CRC32C of the length, the data, uint32 masked
CRC32C of the data (little-endian). TensorFlow checks both CRCs as it reads; this reader does too, so that the
readers TensorFlow does not serve (shards in a bucket, `medclip verify-shards`) catch a flipped byte as well, and
name the record it is in. No TensorFlow import: `verify-shards` starts in a second.

CRC32C is also the checksum GCS keeps for every object; the manifest records each shard's whole-file CRC32C as
8 hex digits, so a bucket's listing alone tells whether an object is the one written. google-crc32c (C, with a
pure-Python fallback) comes with google-cloud-storage, which gcsfs needs.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import IO

import google_crc32c

from medclip.data.shard_manifest import CorruptShardError

_MASK_DELTA = 0xA282EAD8
_HEADER = struct.Struct("<QI")  # length, masked CRC of the length
_FOOTER = struct.Struct("<I")  # masked CRC of the data


def masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC32C: rotated and offset, so that a CRC of data holding CRCs stays well spread."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def crc32c_hex(data: bytes) -> str:
    return f"{google_crc32c.value(data):08x}"


def read_records(f: IO[bytes], path: str, start: int = 0, stop: int | None = None,
                 crc: list[int] | None = None) -> Iterator[bytes]:
    """Records [start, stop) of an open TFRecord file, each checked against both CRCs; rows before `start` are
    skipped by seeking past their data (their length CRC is still checked). A frame that does not check raises
    `CorruptShardError` naming the file and the row: the rest of the file cannot be trusted to be framed right.
    `crc`, a one-item list, is extended with every byte read, for the whole file's CRC32C (read from row 0)."""
    row = 0
    while stop is None or row < stop:
        header = f.read(_HEADER.size)
        if crc is not None:
            crc[0] = google_crc32c.extend(crc[0], header)
        if not header:
            return
        if len(header) < _HEADER.size:
            raise CorruptShardError(path, row, "the file ends inside a record header")
        length, length_crc = _HEADER.unpack(header)
        if masked_crc(header[:8]) != length_crc:
            raise CorruptShardError(path, row, "the length's CRC does not match")
        if row < start:
            f.seek(length + _FOOTER.size, 1)
        else:
            data = f.read(length)
            footer = f.read(_FOOTER.size)
            if crc is not None:
                crc[0] = google_crc32c.extend(google_crc32c.extend(crc[0], data), footer)
            if len(data) < length or len(footer) < _FOOTER.size:
                raise CorruptShardError(path, row, "the file ends inside the record")
            if masked_crc(data) != _FOOTER.unpack(footer)[0]:
                raise CorruptShardError(path, row, "the data's CRC does not match")
            yield data
        row += 1
