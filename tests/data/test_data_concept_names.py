"""Concept names: ROCOv2's cui_mapping.csv read by itself, --concept_names for any dataset, the second text input
written as the names joined (the CLIP-TF report's), and the codes with one warning when there are none."""

from __future__ import annotations

import logging

import pytest

from medclip.data.fields import second_texts
from medclip.data.records import Record
from medclip.data.sources.concept_names import (ConceptNamesError, concept_names_for, name_records,
                                                read_concept_names)
from medclip.training import data_feed
from medclip.training.arguments import DataArguments
from medclip.training.config_check import DataError
from tests.data.test_data_rocov2 import CAPTIONS, rocov2_root  # noqa: F401 (fixture)

MAPPING = 'CUI,Canonical name\nC0040405,X-Ray Computed Tomography\nC0000001,"Lesion, focal"\n'


def test_read_concept_names_skips_the_header_and_keeps_quoted_commas(tmp_path):
    (tmp_path / "cui_mapping.csv").write_text(MAPPING, encoding="utf-8")
    assert read_concept_names(tmp_path / "cui_mapping.csv") == {"C0040405": "X-Ray Computed Tomography",
                                                                "C0000001": "Lesion, focal"}
    (tmp_path / "names.csv").write_text("C0024485,Magnetic Resonance Imaging\n", encoding="utf-8")  # no header
    assert read_concept_names(tmp_path / "names.csv") == {"C0024485": "Magnetic Resonance Imaging"}
    (tmp_path / "bad.csv").write_text("CUI,name\nC0024485\n", encoding="utf-8")
    with pytest.raises(ConceptNamesError, match=r"bad.csv:2: expected CUI,name"):
        read_concept_names(tmp_path / "bad.csv")
    with pytest.raises(ConceptNamesError, match="no file"):
        read_concept_names(tmp_path / "absent.csv")


def test_second_text_is_the_names_joined_and_codes_without_a_name(tmp_path):
    items = [Record("a", "a.jpg", ["cap"], concepts=["C0040405", "C9999999"]), Record("b", "b.jpg", ["cap"])]
    assert second_texts(items, "concepts") == ["C0040405, C9999999", ""]  # no names: the codes, as before
    assert name_records(items, {"C0040405": "X-Ray Computed Tomography"}) == 1  # one concept has no name
    assert second_texts(items, "concepts") == ["X-Ray Computed Tomography, C9999999", ""]
    assert items[0].concepts == ["C0040405", "C9999999"]  # the codes stay for the concept-aware losses


def test_rocov2_names_are_read_by_themselves_and_a_file_overrides_them(rocov2_root, tmp_path):  # noqa: F811
    assert concept_names_for(rocov2_root) == {}
    (rocov2_root / "cui_mapping.csv").write_text(MAPPING, encoding="utf-8")
    assert concept_names_for(rocov2_root)["C0040405"] == "X-Ray Computed Tomography"
    assert concept_names_for(rocov2_root / "train_captions.csv")["C0000001"] == "Lesion, focal"
    args = DataArguments(data_dir=str(rocov2_root), second_text_field="concepts")
    items, _ = data_feed.load_split(args, "train", tmp_path, seed=0)
    assert second_texts(items, "concepts")[1] == "X-Ray Computed Tomography, Lesion, focal"
    mine = tmp_path / "mine.csv"
    mine.write_text("C0040405,computed tomography\n", encoding="utf-8")
    args = DataArguments(data_dir=str(rocov2_root), second_text_field="concepts", concept_names=str(mine))
    items, _ = data_feed.load_split(args, "validation", tmp_path, seed=0)
    assert second_texts(items, "concepts") == ["computed tomography, C0000000"]
    with pytest.raises(DataError, match="no file"):
        data_feed.load_split(DataArguments(data_dir=str(rocov2_root), second_text_field="concepts",
                                           concept_names=str(tmp_path / "typo.csv")), "train", tmp_path, seed=0)


def test_without_names_the_codes_are_used_and_it_is_said_once(rocov2_root, tmp_path, caplog,  # noqa: F811
                                                              monkeypatch):
    monkeypatch.setattr(data_feed, "_said_no_names", [])
    args = DataArguments(data_dir=str(rocov2_root), second_text_field="concepts")
    with caplog.at_level(logging.WARNING, logger="medclip.training.data_feed"):
        items, _ = data_feed.load_split(args, "train", tmp_path, seed=0)
        data_feed.load_split(args, "validation", tmp_path, seed=0)
    assert second_texts(items, "concepts")[0] == "C0040405, C0000000"
    assert sum("no concept names" in m for m in caplog.messages) == 1
    assert len(CAPTIONS["train"]) == len(items)
