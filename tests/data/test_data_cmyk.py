"""CMYK JPEGs (PMC figures include them) are valid images: converted to RGB as PIL does, kept and counted."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from medclip.data import image_checks, images
from medclip.data.pipeline import ImageSettings, make_eval_dataset, tokenize_captions
from medclip.data.records import DropCounter
from medclip.data.sources import jsonl
from tests.data import bad_files

CAPTION = "Axial computed tomography of the chest with a mass."


def pil_rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float32)


@pytest.fixture(scope="module")
def cmyk_files(tmp_path_factory):
    """An Adobe-style (inverted, APP14 marker) and a plain CMYK JPEG, plus an RGB one, listed in JSON lines."""
    folder = tmp_path_factory.mktemp("cmyk")
    data = {"adobe.jpg": bad_files.cmyk_jpeg(64), "plain.jpg": bad_files.cmyk_jpeg(64, adobe=False),
            "rgb.jpg": bad_files.jpeg_bytes(size=(64, 64))}
    for name, content in data.items():
        (folder / name).write_bytes(content)
    lines = [json.dumps({"id": name, "image_path": name, "captions": [CAPTION]}) for name in data]
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder, data


def test_both_kinds_are_cmyk_to_pil(cmyk_files):
    _, data = cmyk_files
    assert Image.open(io.BytesIO(data["adobe.jpg"])).info.get("adobe") is not None
    assert Image.open(io.BytesIO(data["plain.jpg"])).info.get("adobe") is None
    # Why TF alone is not enough: it reads every CMYK JPEG as Adobe-inverted, so the plain one comes out inverted.
    tf_plain = tf.io.decode_jpeg(data["plain.jpg"], channels=3).numpy().astype(np.float32)
    assert np.abs(tf_plain - pil_rgb(data["plain.jpg"])).mean() > 40


def test_cmyk_is_kept_converted_and_counted(cmyk_files):
    folder, data = cmyk_files
    counter = DropCounter()
    items = jsonl.load_jsonl(folder / "data.jsonl", counter=counter)
    assert [r.id for r in items] == ["adobe.jpg", "plain.jpg", "rgb.jpg"]
    assert counter.dropped == 0 and counter.kept == 3
    assert counter.summary()["changed"] == {"converted_cmyk": 2}
    assert isinstance(items[0].image, bytes) and isinstance(items[2].image, str)  # RGB files are read by TF
    for record in items[:2]:
        decoded = images.decode_rgb(tf.constant(record.image)).numpy()
        np.testing.assert_array_equal(decoded, pil_rgb(data[record.id]))  # lossless PNG of PIL's conversion


def test_pipeline_pixels_match_pil(cmyk_files, tokenizer):
    folder, data = cmyk_files
    items = jsonl.load_jsonl(folder / "data.jsonl", counter=DropCounter())
    batch = next(iter(make_eval_dataset(items, tokenize_captions(items, tokenizer, 16), global_batch_size=3,
                                        image=ImageSettings(size=32), process_index=0, process_count=1)))
    for row, name in enumerate(["adobe.jpg", "plain.jpg"]):
        buffer = io.BytesIO()
        Image.open(io.BytesIO(data[name])).convert("RGB").save(buffer, "PNG")
        expected = images.eval_image(tf.constant(buffer.getvalue()), 32).numpy()
        np.testing.assert_allclose(batch["pixel_values"][row], expected, atol=1e-5)
        # On the 0-255 scale, against PIL's RGB resized the same way: within a level.
        pixels = (batch["pixel_values"][row] * np.asarray(images.CLIP_STD) + np.asarray(images.CLIP_MEAN)) * 255
        reference = images.resize(tf.constant(pil_rgb(data[name])), 32).numpy()
        assert np.abs(pixels - reference).max() < 0.5
    # The RGB JPEG still takes TF's JPEG path, unchanged.
    np.testing.assert_allclose(batch["pixel_values"][2], images.eval_image(tf.constant(data["rgb.jpg"]), 32).numpy(),
                               atol=1e-6)


def test_header_check_says_cmyk_needs_conversion(cmyk_files):
    _, data = cmyk_files
    assert image_checks.inspect_image(data["plain.jpg"]) == (None, True)
    assert image_checks.inspect_image(data["rgb.jpg"]) == (None, False)
    assert image_checks.rgb_image(data["rgb.jpg"]) is data["rgb.jpg"]
