"""Shard integrity: `medclip prepare` records each shard's CRC32C; `medclip verify-shards` reads every shard and
names each bad one (a flipped byte, a truncated-then-padded file) in one line with its record, an intact folder
verifies clean, and so does one prepared before the CRC32C was recorded (saying so). A corrupt record met while
reading or streaming is a typed one-line error naming the shard, the record and the verify command: training
exits with that line, never with a DataLossError traceback, and no example is quietly lost or misplaced."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import google_crc32c
import numpy as np
import pytest

from medclip import cli
from medclip.data import shards
from medclip.data.shard_manifest import CorruptShardError, ShardError, load_metadata, open_split
from tests import killable_run
from tests.test_shards import N, prepare_shards, write_source

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("shards")
    prepare_shards(write_source(tmp_path_factory.mktemp("source")), output)
    return output


def copy_of(prepared: Path, folder: Path) -> Path:
    shutil.copytree(prepared, folder)
    return folder


def shard_path(folder: Path, number: int, split: str = "train") -> Path:
    manifest = json.loads((folder / "manifest.json").read_text())
    return folder / manifest["splits"][split]["shards"][number]["name"]


def record_at(data: bytes, offset: int) -> int:
    """The row of the TFRecord frame holding byte `offset`."""
    row, start = 0, 0
    while True:
        (length,) = struct.unpack("<Q", data[start : start + 8])
        end = start + 16 + length
        if offset < end:
            return row
        row, start = row + 1, end


def flip_byte(shard: Path, fraction: float = 0.5) -> int:
    """Flips one byte `fraction` into the file (its size unchanged); returns the row of the record hit."""
    data = bytearray(shard.read_bytes())
    offset = int(len(data) * fraction)
    row = record_at(bytes(data), offset)
    data[offset] ^= 0x5A
    shard.write_bytes(bytes(data))
    return row


def truncate_and_pad(shard: Path) -> int:
    """The first half of the file, then zeros to its size (an upload cut short and padded); the row cut."""
    data = shard.read_bytes()
    half = len(data) // 2
    shard.write_bytes(data[:half] + bytes(len(data) - half))
    return record_at(data, half)


def verify(folder, capsys, *extra: str) -> tuple[int, list[str]]:
    code = cli.main(["verify-shards", str(folder), "--no_progress", *extra])
    return code, capsys.readouterr().out.strip().splitlines()


def test_the_manifest_records_each_shards_crc32c(prepared):
    entries = json.loads((prepared / "manifest.json").read_text())["splits"]["train"]["shards"]
    for entry in entries:
        assert entry["crc32c"] == f"{google_crc32c.value((prepared / entry['name']).read_bytes()):08x}"
    assert open_split(prepared, "train").checksums == tuple(entry["crc32c"] for entry in entries)


def test_an_intact_folder_verifies_clean(prepared, capsys):
    code, lines = verify(prepared, capsys)
    assert code == 0, lines
    assert lines == [f"{prepared}: all 8 shards of train intact ({N - 1} examples, "
                     f"{sum(p.stat().st_size for p in prepared.glob('*.tfrecord'))} bytes)"]


def test_verify_names_each_bad_shard_and_record_in_one_line(prepared, tmp_path, capsys):
    folder = copy_of(prepared, tmp_path / "shards")
    flipped, cut = shard_path(folder, 2), shard_path(folder, 5)
    flipped_row, cut_row = flip_byte(flipped), truncate_and_pad(cut)
    open_split(folder, "train")  # sizes unchanged: the start-up check on a local folder passes
    missing = shard_path(folder, 6)
    missing.unlink()
    code, lines = verify(folder, capsys)
    assert code == 1
    bad = [line for line in lines if line.startswith("BAD ")]
    assert len(bad) == 3, lines
    assert bad[0] == f"BAD {flipped}: record {flipped_row}: the data's CRC does not match"
    assert bad[1].startswith(f"BAD {cut}: record {cut_row}: the ") and bad[1].endswith("CRC does not match")
    assert bad[2] == f"BAD {missing}: missing"
    assert "3 bad file(s)" in lines[-1] and "prepare the data again" in lines[-1]


def test_a_manifest_without_checksums_still_loads_and_verifies(prepared, tmp_path, capsys):
    folder = copy_of(prepared, tmp_path / "old")
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["splits"]["train"]["shards"]:
        del entry["crc32c"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert open_split(folder, "train").checksums == (None,) * 8
    assert len(shards.load_shards(folder, "train")) == N - 1
    code, lines = verify(folder, capsys)
    assert code == 0 and "no CRC32C for 8 shards (prepared by an older medclip)" in lines[0] and "intact" in lines[-1]
    row = flip_byte(shard_path(folder, 0), 0.3)
    code, lines = verify(folder, capsys)
    assert code == 1 and f"BAD {shard_path(folder, 0)}: record {row}:" in "\n".join(lines)


def test_verify_on_a_folder_that_is_not_prepared_is_a_usage_error(tmp_path, capsys):
    assert cli.main(["verify-shards", str(tmp_path), "--no_progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "manifest.json" in err


def test_reading_a_corrupt_shard_whole_is_one_typed_line(prepared, tmp_path):
    folder = copy_of(prepared, tmp_path / "shards")
    shard = shard_path(folder, 3)
    row = flip_byte(shard)
    with pytest.raises(CorruptShardError) as caught:
        shards.load_shards(folder, "train")
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{shard}: record {row} is corrupt")
    assert f"medclip verify-shards {folder}" in message


def make_iterator(folder: Path | str, tokenizer_dir: Path):
    from medclip.data import pipeline
    from medclip.data.synthetic import write_synthetic_tokenizer

    split = open_split(folder, "train")
    items = load_metadata(split)
    tokenizer = write_synthetic_tokenizer(tokenizer_dir)
    return pipeline.make_train_dataset(items, pipeline.tokenize_captions(items, tokenizer, 16), global_batch_size=4,
                                       seed=7, process_index=0, process_count=1,
                                       image=pipeline.ImageSettings(size=16, train_crop="center"),
                                       stream=shards.ShardStream(split, cycle=3, window=5))


def stream_until_error(iterator) -> tuple[list[dict], list[int], CorruptShardError]:
    """The batches before the error, their positions, and the error (met within two epochs)."""
    batches, positions = [], []
    for _ in range(2 * iterator.steps_per_epoch):
        start = iterator.position
        try:
            batches.append(next(iterator))
        except CorruptShardError as error:
            return batches, positions, error
        positions.extend(range(start, iterator.position))
    pytest.fail("the corrupt shard was streamed without an error")


@pytest.mark.parametrize("damage", [flip_byte, truncate_and_pad])
def test_streaming_a_corrupt_shard_stops_with_one_line_and_loses_nothing_before(prepared, tmp_path, damage):
    """The batches before the error are exactly the intact run's (same examples at the same positions); the error
    names the shard, the record and the verify command."""
    reference = make_iterator(prepared, tmp_path / "tokenizer")
    folder = copy_of(prepared, tmp_path / "shards")
    shard = shard_path(folder, 4)
    row = damage(shard)
    batches, positions, error = stream_until_error(make_iterator(folder, tmp_path / "tokenizer"))
    message = str(error)
    assert "\n" not in message and message.startswith(f"{shard}: record {row} is corrupt")
    assert f"medclip verify-shards {folder}" in message
    assert positions == list(range(len(positions)))  # contiguous: nothing skipped before the error
    for got in batches:
        expected = next(reference)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])
    trained = np.concatenate([reference.order(0), reference.order(1)])[: len(positions)]
    assert int(open_split(prepared, "train").offsets[4]) + row not in trained.tolist()  # not trained on


@pytest.mark.heavy  # one trainer process (about a minute on 2 busy cores): scheduled first
def test_the_trainer_exits_with_one_line_on_a_corrupt_shard(prepared, tmp_path):
    """Through run_hybrid_clip.py as a user runs it: one shard whose first record is corrupt (every read of it
    fails at once) ends the run with exit 3 and one line; no traceback, no hang."""
    folder = tmp_path / "one-shard"
    prepare_shards(write_source(tmp_path / "source"), folder, "--shard_size", "64")
    shard = shard_path(folder, 0)
    data = bytearray(shard.read_bytes())
    data[40] ^= 0x5A  # inside record 0's data
    shard.write_bytes(bytes(data))
    model = killable_run.tiny_model(tmp_path)
    done = subprocess.run([sys.executable, "run_hybrid_clip.py", "--output_dir", str(tmp_path / "run"),
                           "--model_name_or_path", str(model), "--data_dir", str(folder), "--do_train",
                           "--max_seq_length", "16", "--per_device_train_batch_size", "8", "--num_train_epochs", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 3, done.stderr[-3000:]
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]
    assert done.stderr.count("data error") == 1 and done.stderr.rstrip().endswith(
        f"run_hybrid_clip.py: data error: {shard}: record 0 is corrupt (the data's CRC does not match); "
        f"run `medclip verify-shards {folder}` to check every shard, then prepare the data again"), done.stderr[-3000:]


def test_a_missing_shard_met_while_streaming_is_one_typed_line(prepared, tmp_path):
    folder = copy_of(prepared, tmp_path / "shards")
    iterator = make_iterator(folder, tmp_path / "tokenizer")  # checked at start-up, removed after
    shard_path(folder, 1).unlink()
    with pytest.raises(ShardError, match=f"{shard_path(folder, 1)}: cannot be read while streaming"):
        for _ in range(2 * iterator.steps_per_epoch):
            next(iterator)
