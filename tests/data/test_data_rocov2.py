"""ROCOv2's CSV layout reached from --data_dir, --train_file and `medclip evaluate`'s DATA argument."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from medclip.data.records import DropCounter
from medclip.data.sources.auto import load_records
from medclip.training.arguments import DataArguments
from medclip.training.data_feed import load_split
from tests.data import bad_files
from tests.data.conftest import ROCO_SAMPLE

CAPTIONS = {
    "train": ["Head CT demonstrating left parotiditis.", "Chest X-ray, PA view: normal heart size.",
              "Axial MRI of the brain showing a lesion."],
    "valid": ["Abdominal ultrasound showing gallstones."],
    "test": ["Coronal CT of the abdomen with contrast.", "Lateral radiograph of the knee."],
}


def _image(index: int) -> bytes:
    """A real ROCO JPEG when the sample is there, a synthetic one otherwise (the layout is what is tested)."""
    images = sorted((ROCO_SAMPLE / "data" / "test" / "radiology" / "images").glob("*.jpg"))[:8]
    return images[index % len(images)].read_bytes() if images else bad_files.jpeg_bytes(seed=index)


@pytest.fixture
def rocov2_root(tmp_path) -> Path:
    """ROCOv2's release layout: {split}_captions.csv (ID,Caption), {split}_concepts.csv (ID,CUIs), {split}/ID.jpg."""
    root = tmp_path / "rocov2"
    n = 0
    for split, captions in CAPTIONS.items():
        (root / split).mkdir(parents=True)
        rows, concepts = ["ID,Caption"], ["ID,CUIs"]
        for i, caption in enumerate(captions):
            image_id = f"ROCOv2_2023_{split}_{i + 1:06d}"
            (root / split / f"{image_id}.jpg").write_bytes(_image(n))
            n += 1
            rows.append(f'{image_id},"{caption}"')
            concepts.append(f"{image_id},C0040405;C{i:07d}")
        (root / f"{split}_captions.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
        (root / f"{split}_concepts.csv").write_text("\n".join(concepts) + "\n", encoding="utf-8")
    return root


def test_data_dir_detects_the_layout_and_names_the_splits(rocov2_root):
    for split, expected in (("train", "train"), ("validation", "valid"), ("valid", "valid"), ("test", "test")):
        counter = DropCounter()
        items = load_records(rocov2_root, split, counter=counter)
        assert [r.captions[0] for r in items] == CAPTIONS[expected]
        assert counter.dropped == 0 and counter.kept == len(CAPTIONS[expected])
    items = load_records(rocov2_root, "train", counter=DropCounter())
    assert items[1].id == "ROCOv2_2023_train_000002"
    assert items[1].concepts == ["C0040405", "C0000001"]  # joined from train_concepts.csv
    assert items[1].image == str(rocov2_root / "train" / "ROCOv2_2023_train_000002.jpg")


def test_a_captions_file_finds_its_images_and_concepts(rocov2_root, tmp_path):
    items = load_records(rocov2_root / "test_captions.csv", "train", counter=DropCounter())
    assert [r.captions[0] for r in items] == CAPTIONS["test"]
    assert items[0].image == str(rocov2_root / "test" / "ROCOv2_2023_test_000001.jpg")
    assert items[0].concepts == ["C0040405", "C0000000"]
    # A CSV that is not ROCOv2's (other columns) is still read as any CSV.
    other = tmp_path / "pairs_captions.csv"
    shutil.copy(rocov2_root / "train" / "ROCOv2_2023_train_000001.jpg", tmp_path / "a.jpg")
    other.write_text("image,caption\na.jpg,Sagittal MRI of the lumbar spine.\n", encoding="utf-8")
    assert [r.id for r in load_records(other, counter=DropCounter())] == ["a.jpg"]


def test_training_flags_reach_rocov2(rocov2_root, tmp_path):
    by_dir = DataArguments(data_dir=str(rocov2_root), expand_abbreviations=True)
    items, counter = load_split(by_dir, "validation", tmp_path, seed=0)
    assert [r.captions for r in items] == [["Abdominal ultrasound showing gallstones."]]
    items, counter = load_split(by_dir, "train", tmp_path, seed=0)
    assert items[0].captions == ["Head computed tomography demonstrating left parotiditis."]
    assert counter.summary()["changed"]["abbreviations_expanded"] == 2  # CT, MRI ("PA" is ambiguous)
    by_file = DataArguments(train_file=str(rocov2_root / "train_captions.csv"),
                            validation_file=str(rocov2_root / "valid_captions.csv"))
    assert len(load_split(by_file, "train", tmp_path, seed=0)[0]) == 3
    assert len(load_split(by_file, "validation", tmp_path, seed=0)[0]) == 1


def test_min_mean_intensity_flag_filters_training_data(rocov2_root, tmp_path):
    items, counter = load_split(DataArguments(data_dir=str(rocov2_root), min_mean_intensity=256.0), "train",
                                tmp_path, seed=0)
    assert items == [] and dict(counter.counts) == {"dark_image": 3}  # every mean is under 256
    items, counter = load_split(DataArguments(data_dir=str(rocov2_root), min_mean_intensity=0.0), "train",
                                tmp_path, seed=0)
    assert len(items) == 3 and counter.dropped == 0


def _move_images(root: Path, pattern: str) -> None:
    """Re-lays the fixture's images as `pattern` (with {split}) says."""
    for split in CAPTIONS:
        target = root / pattern.format(split=split)
        staged = root.parent / f"staged_{split}"
        shutil.move(root / split, staged)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(staged, target)


@pytest.mark.parametrize("layout, pattern", [
    ("release", "{split}"),  # Zenodo's {split}_images.zip unzipped in the root
    ("kaggle", "{split}_images/{split}"),  # the archive unpacked into a folder of its name
    ("flat archive", "{split}_images"),
    ("images/split", "images/{split}"),
])
def test_every_published_image_layout_is_found_and_named(rocov2_root, layout, pattern, caplog):
    if pattern != "{split}":
        _move_images(rocov2_root, pattern)
    caplog.set_level("INFO", logger="medclip.data.sources.csv_source")
    for split, expected in (("train", "train"), ("validation", "valid"), ("test", "test")):
        counter = DropCounter()
        items = load_records(rocov2_root, split, counter=counter)
        assert counter.dropped == 0 and len(items) == len(CAPTIONS[expected])
        folder = rocov2_root / pattern.format(split=expected)
        assert items[0].image == str(folder / f"ROCOv2_2023_{expected}_000001.jpg")
    assert f"ROCOv2 test: images in {rocov2_root / pattern.format(split='test')} ({layout} layout, found)" \
        in caplog.messages


def test_an_empty_decoy_folder_does_not_hide_the_images(rocov2_root):
    _move_images(rocov2_root, "{split}_images/{split}")
    (rocov2_root / "test").mkdir()  # e.g. an unrelated or half-extracted folder: the probe image is not there
    items = load_records(rocov2_root, "test", counter=DropCounter())
    assert items[0].image == str(rocov2_root / "test_images" / "test" / "ROCOv2_2023_test_000001.jpg")


def test_no_image_folder_counts_every_image_missing_and_says_where_it_looked(rocov2_root, caplog):
    shutil.rmtree(rocov2_root / "test")
    counter = DropCounter()
    assert load_records(rocov2_root, "test", counter=counter) == []
    assert dict(counter.counts) == {"missing_file": 2}
    assert any("no image folder" in m and "test_images/test/" in m for m in caplog.messages)
