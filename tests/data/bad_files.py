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


def cmyk_jpeg(size: int = 32, adobe: bool = True) -> bytes:
    """A valid CMYK JPEG (a gradient in all four inks). PIL writes Adobe-style inverted CMYK with an APP14 "Adobe"
    marker; `adobe=False` strips the marker, which makes the same bytes a plain (non-inverted) CMYK JPEG."""
    y, x = np.mgrid[0:size, 0:size] * (256 // size)
    inks = np.stack([x, y, (x + y) // 2, 255 - x], axis=-1).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(inks, "CMYK").save(buffer, "JPEG", quality=95)
    data = buffer.getvalue()
    if not adobe:
        start = data.index(b"\xff\xee")
        data = data[:start] + data[start + 2 + struct.unpack(">H", data[start + 2 : start + 4])[0]:]
    return data


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
    """A ROCO tree with three good records (one a CMYK JPEG) and every bad case; returns (captions.txt, expected drops by reason)."""
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
    lines.append(good_line("ROCO_90004"))  # a CMYK JPEG is a good image: converted to RGB, kept
    images["ROCO_90004"] = cmyk_jpeg(adobe=False)
    expected.update(invalid_utf8=1, malformed_line=1, duplicate_id=1)
    return write_roco_tree(root, lines, images), expected
