"""Sources: ROCO raw layout (the real sample), CSV and ROCOv2, JSON lines, Hugging Face datasets, TFDS."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medclip.data.records import DropCounter
from medclip.data.sources import csv_source, hf_datasets, jsonl, roco
from tests.data import bad_files


def test_roco_sample(roco_sample):
    counter = DropCounter()
    items = roco.load_roco(roco_sample, "test", counter=counter)
    assert len(items) == 499 and counter.kept == 499
    assert dict(counter.counts) == {"short_caption": 1}  # "OPG."
    first = items[0]
    assert first.id == "ROCO_00153" and Path(first.image).is_file()
    assert first.captions[0].startswith("Distension digestive avec")  # non-English kept, leading space gone
    assert first.concepts == ["C0012238"] and "distension" in first.keywords
    assert all(not c[0].isspace() for r in items for c in r.captions)
    assert roco.available_splits(roco_sample) == ["test"]
    assert len(roco.load_roco(roco_sample / "data", "test")) == 499  # the data/ folder works too


def test_roco_missing_split_says_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="captions.txt"):
        roco.load_roco(tmp_path, "train")


def test_roco_both_subsets(tmp_path):
    bad_files.write_roco_tree(tmp_path, [bad_files.good_line("ROCO_1")], {"ROCO_1": bad_files.jpeg_bytes()})
    bad_files.write_roco_tree(tmp_path, [bad_files.good_line("ROCO_2")], {"ROCO_2": bad_files.jpeg_bytes()},
                              subset="non-radiology")
    assert [r.id for r in roco.load_roco(tmp_path, "train", roco.SUBSETS)] == ["ROCO_1", "ROCO_2"]


def test_csv_with_configurable_columns(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(bad_files.jpeg_bytes())
    (tmp_path / "imgs" / "b.jpg").write_bytes(bad_files.jpeg_bytes(seed=1))
    (tmp_path / "pairs.tsv").write_bytes(
        b"file\ttext\tkey\n"
        b"a.jpg\t\"A quoted caption, with a tab\tinside.\"\tk1\n"
        b"b.jpg\tshort\tk2\n"
        b"b.jpg\tCaption with \xff invalid bytes here.\tk3\n"
        b"missing.jpg\tCaption for an image that is not there.\tk4\n"
    )
    counter = DropCounter()
    items = csv_source.load_csv(tmp_path / "pairs.tsv", image_column="file", caption_column="text", id_column="key",
                                image_dir=tmp_path / "imgs", delimiter="\t", counter=counter)
    assert [(r.id, r.captions) for r in items] == [("k1", ["A quoted caption, with a tab inside."])]
    assert dict(counter.counts) == {"short_caption": 1, "invalid_utf8": 1, "missing_file": 1}
    assert counter.examples["missing_file"][0].startswith(f"{tmp_path / 'pairs.tsv'}:5")


def test_rocov2_layout(tmp_path):
    (tmp_path / "train").mkdir()
    for name in ("ROCOv2_2023_train_000001", "ROCOv2_2023_train_000002"):
        (tmp_path / "train" / f"{name}.jpg").write_bytes(bad_files.jpeg_bytes())
    (tmp_path / "train_captions.csv").write_text(
        "ID,Caption\nROCOv2_2023_train_000001,Head CT demonstrating left parotiditis.\n"
        "ROCOv2_2023_train_000002,\"Chest X-ray, PA view: normal.\"\n", encoding="utf-8")
    (tmp_path / "train_concepts.csv").write_text(
        "ID,CUIs\nROCOv2_2023_train_000001,C0040405;C0030580\n", encoding="utf-8")
    items = csv_source.load_rocov2(tmp_path, "train")
    assert [r.captions[0] for r in items] == ["Head CT demonstrating left parotiditis.",
                                              "Chest X-ray, PA view: normal."]
    assert items[0].concepts == ["C0040405", "C0030580"] and items[1].concepts == []


def test_jsonl_original_medclip_format_and_round_trip(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "x.jpg").write_bytes(bad_files.jpeg_bytes())
    source = tmp_path / "train.jsonl"
    line = {"image_path": "images/x.jpg", "captions": ["b'Axial CT of the chest showing a mass.'"]}
    source.write_text(json.dumps(line) + "\n", encoding="utf-8")
    items = jsonl.load_jsonl(source)
    assert items[0].captions == ["Axial CT of the chest showing a mass."]
    assert items[0].image == str(tmp_path / "images" / "x.jpg") and items[0].id == "images/x.jpg"
    copy = jsonl.write_jsonl(items, tmp_path / "out" / "copy.jsonl")
    assert json.loads(copy.read_text())["image_path"] == "../images/x.jpg"
    assert jsonl.load_jsonl(copy)[0].image == str(tmp_path / "out" / ".." / "images" / "x.jpg")


def _hf_dataset(tmp_path):
    import datasets

    (tmp_path / "a.jpg").write_bytes(bad_files.jpeg_bytes())
    rows = {
        "image": [{"bytes": bad_files.jpeg_bytes(seed=1), "path": None},
                  {"bytes": None, "path": str(tmp_path / "a.jpg")},
                  {"bytes": bad_files.BAD_CASES["text_as_jpeg"][0], "path": None}],
        "caption": ["Axial CT of the chest showing a mass.", "MRI of the head with no abnormality.",
                    "Ultrasound of the abdomen, not an image."],
        "uid": ["r0", "r1", "r2"],
    }
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                  "uid": datasets.Value("string")})
    return datasets.Dataset.from_dict(rows, features=features)


def test_hf_dataset_saved_to_disk_and_parquet(tmp_path):
    dataset = _hf_dataset(tmp_path)
    dataset.save_to_disk(str(tmp_path / "saved"))
    dataset.to_parquet(str(tmp_path / "data.parquet"))
    for location in (tmp_path / "saved", tmp_path / "data.parquet"):
        counter = DropCounter()
        items = hf_datasets.load_hf_dataset(location, id_column="uid", counter=counter)
        assert [r.id for r in items] == ["r0", "r1"], location
        assert isinstance(items[0].image, bytes) and items[0].image[:2] == b"\xff\xd8"
        assert dict(counter.counts) == {"not_an_image": 1}
    with pytest.raises(KeyError, match="no column 'text'"):
        hf_datasets.load_hf_dataset(tmp_path / "saved", caption_column="text")


def test_tfds_builder_reads_the_manual_directory(tmp_path):
    import tensorflow_datasets as tfds

    from medclip.data.sources import tfds_roco

    lines = [bad_files.good_line("ROCO_1"), bad_files.good_line("ROCO_2", "OPG."), bad_files.good_line("ROCO_3")]
    bad_files.write_roco_tree(tmp_path / "roco", lines, {f"ROCO_{i}": bad_files.jpeg_bytes(seed=i) for i in (1, 2, 3)},
                              split="validation")
    builder = tfds_roco.Roco(data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "roco")))
    items = tfds_roco.load_tfds_roco(builder, "validation")
    assert sorted(r.id for r in items) == ["ROCO_1", "ROCO_3"]
    image_dir = tmp_path / "roco/data/validation/radiology/images"
    assert all(r.image == (image_dir / f"{r.id}.jpg").read_bytes() for r in items)
    assert builder.info.metadata["drops_validation"]["dropped_by_reason"] == {"short_caption": 1}


def test_auto_picks_the_source_from_the_path(tmp_path):
    from medclip.data.sources import auto

    bad_files.write_roco_tree(tmp_path / "roco", [bad_files.good_line("ROCO_1")], {"ROCO_1": bad_files.jpeg_bytes()})
    (tmp_path / "a.jpg").write_bytes(bad_files.jpeg_bytes())
    (tmp_path / "pairs.csv").write_text("image,caption\na.jpg,Axial CT of the chest showing a mass.\n")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"image_path": "a.jpg", "captions": ["MRI of the head."]}) + "\n")
    _hf_dataset(tmp_path).save_to_disk(str(tmp_path / "hf"))
    expected = {"roco": ["ROCO_1"], "pairs.csv": ["a.jpg"], "pairs.jsonl": ["a.jpg"], "hf": ["0", "1"]}
    for name, ids in expected.items():
        counter = DropCounter()
        assert [r.id for r in auto.load_records(tmp_path / name, "train", counter=counter)] == ids, name
