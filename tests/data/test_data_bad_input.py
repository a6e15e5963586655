"""Bad input: every case is skipped and counted under its reason, or stops a strict run naming file and line."""

from __future__ import annotations

import json

import pytest

from medclip.data import image_checks, records
from medclip.data.records import DataError, DropCounter, Record
from medclip.data.sources import jsonl, roco
from tests.data import bad_files


def test_roco_counts_every_bad_case_by_reason(tmp_path):
    captions_path, expected = bad_files.write_bad_roco(tmp_path)
    counter = DropCounter()
    items = roco.load_roco(tmp_path, "train", counter=counter)
    assert sorted(r.id for r in items) == ["ROCO_90001", "ROCO_90003", "ROCO_90004"]
    assert dict(counter.counts) == expected
    assert counter.kept == 3 and dict(counter.changes) == {"converted_cmyk": 1}
    assert counter.kept + counter.dropped == len(bad_files.BAD_CASES) + 6  # every line of captions.txt accounted for
    # the examples name the file and line
    assert f"{captions_path}:1: missing_file" in counter.examples["missing_file"][0]


@pytest.mark.parametrize("name", sorted(bad_files.BAD_CASES))
def test_strict_mode_stops_with_file_and_line(tmp_path, name):
    data, caption, reason = bad_files.BAD_CASES[name]
    lines = [bad_files.good_line("ROCO_00001"), f"ROCO_00002\t {caption}".encode()]
    images = {"ROCO_00001": bad_files.jpeg_bytes(), "ROCO_00002": data}
    captions_path = bad_files.write_roco_tree(tmp_path, lines, images)
    with pytest.raises(DataError) as error:
        roco.load_roco(tmp_path, "train", strict=True)
    assert f"{captions_path}:2: {reason}" in str(error.value)


@pytest.mark.parametrize("line, reason", [
    (b"ROCO_00002\t caption with \xff bytes that are not UTF-8", "invalid_utf8"),
    (b"a line without any tab", "malformed_line"),
    (bad_files.good_line("ROCO_00001"), "duplicate_id"),
])
def test_strict_mode_for_line_problems(tmp_path, line, reason):
    images = {"ROCO_00001": bad_files.jpeg_bytes(), "ROCO_00002": bad_files.jpeg_bytes()}
    captions_path = bad_files.write_roco_tree(tmp_path, [bad_files.good_line("ROCO_00001"), line], images)
    with pytest.raises(DataError, match=f"{captions_path}:2: {reason}"):
        roco.load_roco(tmp_path, "train", strict=True)


def test_jsonl_bad_lines(tmp_path):
    (tmp_path / "good.jpg").write_bytes(bad_files.jpeg_bytes())
    (tmp_path / "bomb.png").write_bytes(bad_files.png_bomb())
    lines = [
        json.dumps({"image_path": "good.jpg", "captions": ["Axial CT of the chest showing a mass."]}).encode(),
        b'{"image_path": "good.jpg", "captions": ["unterminated',  # malformed JSON
        b'{"image_path": "good.jpg", "captions": ["bad \xc3\x28 byte sequence here"]}',  # not UTF-8
        json.dumps({"id": "x", "image_path": "good.jpg", "captions": ["   "]}).encode(),  # whitespace caption
        json.dumps({"id": "y", "captions": ["Axial CT of the chest showing a mass."]}).encode(),  # no image_path
        json.dumps(["not", "an", "object"]).encode(),
        json.dumps({"image_path": "bomb.png", "captions": ["Axial CT of the chest showing a mass."]}).encode(),
        json.dumps({"image_path": "good.jpg", "captions": ["Duplicate of the first line's id."]}).encode(),
        b"",  # blank lines are not records
    ]
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(lines))
    counter = DropCounter()
    items = jsonl.load_jsonl(path, counter=counter)
    assert len(items) == 1
    assert dict(counter.counts) == {"malformed_json": 1, "invalid_utf8": 1, "empty_caption": 1, "malformed_line": 2,
                                    "decompression_bomb": 1, "duplicate_id": 1}
    with pytest.raises(DataError, match=f"{path}:2: malformed_json"):
        jsonl.load_jsonl(path, strict=True)


@pytest.mark.parametrize("name", ["truncated_jpeg", "text_as_jpeg", "png_bomb", "jpeg_bomb", "zero_byte"])
def test_image_problem_never_raises_on_bytes(name):
    data, _, reason = bad_files.BAD_CASES[name]
    assert image_checks.image_problem(data)[0] == reason


def test_max_pixels_is_configurable(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(bad_files.jpeg_bytes(size=(40, 32)))
    assert image_checks.image_problem(str(path)) is None
    assert image_checks.image_problem(str(path), max_pixels=1000)[0] == records.DECOMPRESSION_BOMB


def test_verify_decode_catches_corruption_the_header_check_misses(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(bad_files.corrupt_middle_jpeg())
    (tmp_path / "good.jpg").write_bytes(bad_files.jpeg_bytes())
    (tmp_path / "dark.png").write_bytes(_png(0))
    items = [Record("bad", str(tmp_path / "bad.jpg"), ["c" * 20], source="list:1"),
             Record("good", str(tmp_path / "good.jpg"), ["c" * 20], source="list:2"),
             Record("dark", str(tmp_path / "dark.png"), ["c" * 20], source="list:3")]
    counter = DropCounter()
    assert len(image_checks.check_images(items, counter)) == 3  # all pass the header check
    kept = image_checks.verify_decode(items, counter, min_mean_intensity=5.0)
    assert [r.id for r in kept] == ["good"]
    assert dict(counter.counts) == {"corrupt_image": 1, "dark_image": 1}
    assert "list:1: corrupt_image" in counter.examples["corrupt_image"][0]
    with pytest.raises(DataError, match="list:1: corrupt_image"):
        image_checks.verify_decode(items, DropCounter(strict=True))


def _png(value: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16), value, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_drop_counter_summary_and_report(tmp_path):
    counter = DropCounter()
    counter.drop("short_caption", "a.txt:3", "'OPG.'")
    counter.drop("short_caption", "a.txt:9")
    counter.drop("missing_file", "a.txt:4")
    counter.kept = 7
    summary = counter.summary()
    assert summary["kept"] == 7 and summary["dropped"] == 3
    assert summary["dropped_by_reason"] == {"missing_file": 1, "short_caption": 2}
    assert "short_caption: 2" in counter.report()
    counter.write_json(tmp_path / "drops.json")
    assert json.loads((tmp_path / "drops.json").read_text()) == summary
