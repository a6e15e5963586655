"""--split_ratios: one source cut into train / validation / test (the CLIP-TF report's 68 / 12 / 20), the same
parts for the same seed, every record in exactly one part."""

from __future__ import annotations

import pytest

from medclip.data.splits import SplitError, parse_ratios, split_records
from medclip.training import data_feed
from medclip.training.arguments import DataArguments
from medclip.training.config_check import ConfigError
from tests.data.test_data_rocov2 import rocov2_root  # noqa: F401 (fixture)


def test_ratios_parse_at_any_scale_and_bad_ones_are_refused():
    assert parse_ratios("68,12,20") == pytest.approx((0.68, 0.12, 0.20))
    assert parse_ratios("0.68,0.12,0.2") == pytest.approx((0.68, 0.12, 0.20))
    assert parse_ratios("8,2,0") == pytest.approx((0.8, 0.2, 0.0))
    for bad in ("68,12", "a,b,c", "68,0,20", "-1,1,1"):
        with pytest.raises(SplitError, match="--split_ratios"):
            parse_ratios(bad)


def test_parts_are_disjoint_cover_everything_and_depend_only_on_the_seed():
    items = list(range(1000))
    parts = split_records(items, parse_ratios("68,12,20"), seed=116)
    assert [len(parts[p]) for p in ("train", "validation", "test")] == [680, 120, 200]
    assert sorted(parts["train"] + parts["validation"] + parts["test"]) == items
    assert all(part == sorted(part) for part in parts.values())  # the source's order is kept within a part
    assert split_records(items, parse_ratios("68,12,20"), seed=116) == parts
    assert split_records(items, parse_ratios("68,12,20"), seed=117)["test"] != parts["test"]
    with pytest.raises(SplitError, match="non-empty"):
        split_records([1, 2], parse_ratios("68,12,20"), seed=0)


def test_training_reads_its_parts_from_the_one_source(rocov2_root, tmp_path):  # noqa: F811
    args = DataArguments(data_dir=str(rocov2_root), split_ratios="1,1,1")
    train, counter = data_feed.load_split(args, "train", tmp_path, seed=3)
    validation, _ = data_feed.load_split(args, "validation", tmp_path, seed=3)
    assert counter.summary()["kept"] == 1 and counter.dropped == 0  # the report counts this part
    ids = {r.id for r in train} | {r.id for r in validation}
    assert len(train) == 1 and len(validation) == 1 and len(ids) == 2
    assert all("_train_" in i for i in ids)  # both from the training folder, not ROCOv2's valid split
    with pytest.raises(ConfigError, match="drop --validation_file"):
        data_feed.load_split(DataArguments(train_file=str(rocov2_root / "train_captions.csv"),
                                           validation_file=str(rocov2_root / "valid_captions.csv"),
                                           split_ratios="68,12,20"), "train", tmp_path, seed=0)
