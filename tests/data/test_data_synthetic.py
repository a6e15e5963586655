"""The synthetic radiology-like generator: deterministic, captions that describe the image, offline tokenizer."""

from __future__ import annotations

import dataclasses

import numpy as np

from medclip.data import synthetic
from medclip.data.records import DropCounter
from medclip.data.sources import jsonl


def test_deterministic_from_the_seed():
    image, caption, attributes = synthetic.make_pair(seed=5, index=17)
    again = synthetic.make_pair(seed=5, index=17)
    np.testing.assert_array_equal(image, again[0])
    assert caption == again[1] and attributes == again[2]
    assert not np.array_equal(image, synthetic.make_pair(seed=6, index=17)[0])
    assert image.shape == (64, 64) and image.dtype == np.uint8


def test_captions_state_the_attributes():
    for index in range(200):
        _, caption, a = synthetic.make_pair(seed=0, index=index)
        assert a.region in caption
        if a.finding == "none":
            assert " left " not in caption and " right " not in caption
        else:
            assert f" {a.size} " in caption and f" {a.side} " in caption
            part = synthetic._PARTS[a.region][synthetic.LEVELS.index(a.level)]
            assert part in caption


def _render(attributes, size=64):
    return synthetic.render(attributes, np.random.default_rng(0), size).astype(float)


def test_findings_are_drawn_where_the_caption_says():
    # Same random stream, with and without the finding: the difference sits on the stated side and level.
    # Radiological convention: the patient's left is the image's right.
    for side, level in [("left", "upper"), ("right", "lower"), ("left", "lower"), ("right", "upper")]:
        for finding in ("mass", "cyst", "fracture", "effusion"):
            attributes = synthetic.Attributes("CT", "abdomen", finding, side, level, "large")
            normal = dataclasses.replace(attributes, finding="none")
            rng_with, rng_without = np.random.default_rng(1), np.random.default_rng(1)
            difference = np.abs(synthetic.render(attributes, rng_with).astype(float)
                                - synthetic.render(normal, rng_without).astype(float))
            ys, xs = np.nonzero(difference > 40)
            assert len(xs) > 20, (finding, side, level)
            assert (xs.mean() > 32) == (side == "left"), (finding, side)
            assert (ys.mean() < 32) == (level == "upper") or finding == "effusion", (finding, level)


def test_modalities_look_different():
    stats = {}
    for modality in synthetic.MODALITIES:
        image = _render(synthetic.Attributes(modality, "chest", "none", "left", "upper", "small"))
        inside = (image[:, 1:] > 15) & (image[:, :-1] > 15)
        roughness = np.median(np.abs(np.diff(image, axis=1))[inside])  # texture, not edges
        stats[modality] = (image.mean(), roughness, (image < 3).mean())
    assert stats["ultrasound"][1] > 2 * max(stats[m][1] for m in ("CT", "MRI", "X-ray"))  # speckle
    assert stats["CT"][1] > stats["MRI"][1]  # CT noise vs MRI's smooth bias field
    assert stats["X-ray"][2] < 0.01 < stats["CT"][2]  # a projection fills the frame; CT has black air around


def test_write_dataset_and_tokenizer(tmp_path):
    path = synthetic.write_synthetic_dataset(tmp_path / "synth", n=12, seed=2, image_size=32, image_format="jpeg")
    counter = DropCounter()
    items = jsonl.load_jsonl(path, counter=counter)
    assert len(items) == 12 and counter.dropped == 0
    assert items[0].image.endswith(".jpg") and items[0].id == "synthetic-2-0"
    tokenizer = synthetic.write_synthetic_tokenizer(tmp_path / "tokenizer")
    for index in range(300):
        caption = synthetic.make_pair(seed=9, index=index)[1]
        assert tokenizer.unk_token_id not in tokenizer(caption)["input_ids"], caption
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    assert reloaded("Axial CT of the chest.")["input_ids"] == tokenizer("Axial CT of the chest.")["input_ids"]
