"""`medclip prepare` / `python -m medclip.data.prepare`: ROCO raw files -> JSON lines plus a drop summary."""

from __future__ import annotations

import json
import subprocess
import sys

from medclip.data import prepare
from medclip.data.sources import jsonl
from tests.data import bad_files


def test_prepare_writes_jsonl_and_a_summary_of_every_drop(tmp_path, capsys):
    captions_path, expected = bad_files.write_bad_roco(tmp_path / "roco")
    corrupt_id = "ROCO_90003"  # passes the header checks, only a real decode finds it
    (captions_path.parent / "images" / f"{corrupt_id}.jpg").write_bytes(bad_files.corrupt_middle_jpeg())
    out = tmp_path / "out"
    assert prepare.main(["--roco-dir", str(tmp_path / "roco"), "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kept"] == 2
    assert summary["splits"]["train"]["dropped_by_reason"] == {**expected, "corrupt_image": 1}
    assert summary["splits"]["train"]["changed"] == {"converted_cmyk": 1}
    items = jsonl.load_jsonl(out / "train.jsonl")
    assert [r.id for r in items] == ["ROCO_90001", "ROCO_90004"] and items[0].concepts == ["C0006826"]
    assert items[1].image == str(out / "converted" / "train" / "ROCO_90004.png")  # the RGB conversion, on disk
    report = capsys.readouterr().out
    assert "missing_file: 1" in report and "kept 2 records" in report and "converted_cmyk: 1" in report


def test_prepare_strict_stops_at_the_first_bad_record(tmp_path, capsys):
    captions_path, _ = bad_files.write_bad_roco(tmp_path / "roco")
    code = prepare.main(["--roco-dir", str(tmp_path / "roco"), "--output-dir", str(tmp_path / "out"), "--strict"])
    assert code == 1
    message = capsys.readouterr().err
    # Caption problems are found while parsing, before any image is opened: line 7 has the empty caption.
    assert f"{captions_path}:7: empty_caption" in message and "without --strict" in message
    assert not (tmp_path / "out" / "train.jsonl").exists()


def test_prepare_options(tmp_path):
    lines = [bad_files.good_line("ROCO_1", "Short one"), bad_files.good_line("ROCO_2")]
    images = {"ROCO_1": bad_files.jpeg_bytes(), "ROCO_2": bad_files.jpeg_bytes(seed=3)}
    bad_files.write_roco_tree(tmp_path / "roco", lines, images, split="validation")
    out = tmp_path / "out"
    args = ["--roco-dir", str(tmp_path / "roco"), "--output-dir", str(out), "--min-caption-length", "5",
            "--min-mean-intensity", "250", "--splits", "validation"]
    assert prepare.main(args) == 0
    summary = json.loads((out / "summary.json").read_text())["splits"]["validation"]
    assert summary["dropped_by_reason"] == {"dark_image": 2}  # random-noise JPEGs average ~128 < 250


def test_python_dash_m_works(roco_sample, tmp_path):
    done = subprocess.run([sys.executable, "-m", "medclip.data.prepare", "--roco-dir", str(roco_sample),
                           "--output-dir", str(tmp_path), "--no-verify-decode"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "kept 499 records, dropped 1" in done.stdout
    assert len((tmp_path / "test.jsonl").read_text().splitlines()) == 499
