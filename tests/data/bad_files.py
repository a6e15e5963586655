"""Writers for good and bad image files and a ROCO raw tree, used by several data tests."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg_bytes(size=(40, 32), mode="RGB", seed=0, quality=90) -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width=100_000, height=100_000) -> bytes:
    """A valid-looking PNG whose header declares width x height (the data would never decompress to it)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + png_chunk(b"IEND", b""))


def jpeg_bomb(width=60_000, height=60_000) -> bytes:
    """A small JPEG whose frame header (SOF0) is patched to declare width x height."""
    data = bytearray(jpeg_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def cmyk_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("CMYK", (32, 32), (10, 200, 30, 0)).save(buffer, "JPEG")
    return buffer.getvalue()


def corrupt_middle_jpeg() -> bytes:
    """Header and end marker intact, entropy-coded data scrambled: only a real decode notices."""
    data = bytearray(jpeg_bytes(size=(96, 96), seed=5))
    start = len(data) // 2
    data[start : start + 300] = np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8).tobytes()
    return bytes(data)


# name -> (image bytes or None for a missing file, caption, reason the record is dropped with)
BAD_CASES = {
    "missing_file": (None, "Axial CT of the chest with a mass.", "missing_file"),
    "zero_byte": (b"", "Axial CT of the chest with a mass.", "empty_file"),
    "truncated_jpeg": (jpeg_bytes(seed=2)[:200], "Axial CT of the chest with a mass.", "truncated_image"),
    "text_as_jpeg": (b"this is a caption file, not an image\n" * 4, "Axial CT of the chest.", "not_an_image"),
    "png_bomb": (png_bomb(), "Axial CT of the chest with a mass.", "decompression_bomb"),
    "jpeg_bomb": (jpeg_bomb(), "Axial CT of the chest with a mass.", "decompression_bomb"),
    "cmyk_jpeg": (cmyk_jpeg(), "Axial CT of the chest with a mass.", "cmyk_image"),
    "empty_caption": (jpeg_bytes(seed=3), "", "empty_caption"),
    "whitespace_caption": (jpeg_bytes(seed=4), " \t \u00a0 ", "empty_caption"),
    "short_caption": (jpeg_bytes(seed=6), "CT head.", "short_caption"),
}


def write_roco_tree(root: Path, lines: list[bytes], images: dict[str, bytes | None], split="train",
                    subset="radiology") -> Path:
    """ROCO's raw layout with the given raw captions.txt lines; returns the captions.txt path."""
    folder = root / "data" / split / subset
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "captions.txt").write_bytes(b"\n".join(lines) + b"\n")
    ids = [line.split(b"\t")[0].decode("utf-8", "replace").strip() for line in lines]
    (folder / "keywords.txt").write_text("".join(f"{i}\t\tchest\tmass\n" for i in ids), encoding="utf-8")
    (folder / "cuis.txt").write_text("".join(f"{i}\t\tC0006826\n" for i in ids), encoding="utf-8")
    for roco_id, data in images.items():
        if data is not None:
            (folder / "images" / f"{roco_id}.jpg").write_bytes(data)
    return folder / "captions.txt"


def good_line(roco_id: str, caption="Chest radiograph showing a right lower lobe mass.") -> bytes:
    return f"{roco_id}\t {caption}".encode()


def write_bad_roco(root: Path) -> tuple[Path, dict[str, int]]:
    """A ROCO tree with two good records and every bad case; returns (captions.txt, expected drops by reason)."""
    lines, images, expected = [], {}, {}
    for number, (data, caption, reason) in enumerate(BAD_CASES.values()):
        roco_id = f"ROCO_{number:05d}"
        lines.append(f"{roco_id}\t {caption}".encode())
        images[roco_id] = data
        expected[reason] = expected.get(reason, 0) + 1
    lines.append(good_line("ROCO_90001"))
    images["ROCO_90001"] = jpeg_bytes(seed=10)
    lines.append(b"ROCO_90002\t Caption with bad bytes \xff\xfe here, long enough")  # not UTF-8
    images["ROCO_90002"] = jpeg_bytes(seed=11)
    lines.append(b"no tab on this line at all")
    lines.append(good_line("ROCO_90001", "A second line for the same id, long enough."))  # duplicate id
    lines.append(good_line("ROCO_90003"))
    images["ROCO_90003"] = jpeg_bytes(seed=12)
    expected.update(invalid_utf8=1, malformed_line=1, duplicate_id=1)
    return write_roco_tree(root, lines, images), expected
