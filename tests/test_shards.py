"""Sharded records (medclip.data.shards): `medclip prepare --format shards` keeps every example of its source (ids,
text and image bytes) and counts what it drops; the stream gives each host a disjoint part, every example once an
epoch across hosts, in the order `ShardStream.order` computes; a stream restored mid-epoch yields exactly the rest
of an uninterrupted run; broken folders fail in one typed line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from medclip.data import prepare, shards
from medclip.data.records import DropCounter
from medclip.data.shard_manifest import ShardError, load_metadata, open_split, read_manifest
from medclip.data.sources.jsonl import load_jsonl
from medclip.data.synthetic import write_synthetic_dataset, write_synthetic_tokenizer

N = 30  # 29 good pairs + one whose image is missing


def write_source(folder: Path) -> Path:
    """N - 1 synthetic pairs and one record whose image file does not exist."""
    write_synthetic_dataset(folder, N - 1, seed=0, image_size=32, name="train")
    with (folder / "train.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps({"id": "gone", "image_path": str(folder / "gone.png"),
                            "captions": ["a chest radiograph with no image file"]}) + "\n")
    return folder / "train.jsonl"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_source(tmp_path_factory.mktemp("source"))


def prepare_shards(source, output, *extra: str) -> None:
    assert prepare.main(["--source", str(source), "--output_dir", str(output), "--format", "shards",
                         "--shard_size", "4", "--no_progress", *extra]) == 0


@pytest.fixture(scope="module")
def prepared(source, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("shards")
    prepare_shards(source, output)
    return output


def check_same_examples(source: Path, prepared: str) -> list:
    """The prepared split holds the source's good records: ids, captions and image bytes, each once."""
    expected = {record.id: record for record in load_jsonl(source, counter=DropCounter())}
    got = shards.load_shards(prepared, "train")
    assert sorted(record.id for record in got) == sorted(expected)
    for record in got:
        assert record.image == Path(expected[record.id].image).read_bytes()
        assert record.captions == expected[record.id].captions
    return got


def test_prepared_shards_hold_the_source_examples_and_count_the_drop(source, prepared, capsys):
    got = check_same_examples(source, str(prepared))
    manifest = read_manifest(prepared)
    split = manifest["splits"]["train"]
    assert split["total"] == N - 1 == sum(s["examples"] for s in split["shards"])
    assert [s["examples"] for s in split["shards"]] == [4] * 7 + [1]
    assert split["drops"]["dropped_by_reason"] == {"missing_file": 1}
    assert [record.id for record in got] != sorted(record.id for record in got)  # written shuffled
    assert [record.id for record in load_metadata(open_split(prepared, "train"))] == [record.id for record in got]


def host_orders(stream, process_count: int, per_epoch: int, epoch: int) -> list[np.ndarray]:
    return [stream.order(7, epoch, host, process_count, per_epoch) for host in range(process_count)]


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_every_example_once_an_epoch_across_hosts(prepared, process_count):
    stream = shards.ShardStream(open_split(prepared, "train"), cycle=3, window=5)
    per_epoch = (N - 1) // process_count
    for epoch in range(2):
        orders = host_orders(stream, process_count, per_epoch, epoch)
        seen = np.concatenate(orders)
        assert len(set(seen.tolist())) == len(seen) == per_epoch * process_count  # disjoint
        if per_epoch * process_count == N - 1:
            assert sorted(seen.tolist()) == list(range(N - 1))
    assert not all(np.array_equal(a, b) for a, b in zip(host_orders(stream, process_count, per_epoch, 0),
                                                        host_orders(stream, process_count, per_epoch, 1)))


def stream_indices(stream, per_epoch: int, host: int, hosts: int, position: int, epochs: int) -> list[int]:
    dataset = stream.dataset(7, per_epoch, host, hosts, position, epochs)
    return [shards.parse(serialized)[0] for _, _, serialized in dataset.as_numpy_iterator()]


def check_stream(prepared, hosts: int = 2, positions=(0, 5, 14, 17)) -> list[list[str]]:
    """Each host's stream reads the order `order` computes, and from any position the rest of it; returns each
    host's ids over two epochs."""
    split = open_split(prepared, "train")
    stream = shards.ShardStream(split, cycle=3, window=5)
    ids = [record.id for record in load_metadata(split)]
    per_epoch = (N - 1) // hosts
    streamed = []
    for host in range(hosts):
        expected = np.concatenate([stream.order(7, epoch, host, hosts, per_epoch) for epoch in range(2)]).tolist()
        for position in positions:
            assert stream_indices(stream, per_epoch, host, hosts, position, 2) == expected[position:], position
        streamed.append([ids[i] for i in expected])
    return streamed


def test_stream_yields_the_computed_order_from_any_position(prepared):
    check_stream(prepared)


def test_training_batches_resume_mid_epoch_exactly(prepared):
    """Through the training pipeline: a restored iterator's batches are the uninterrupted run's, and each
    position's pixels are those of the record the order names."""
    from medclip.data import pipeline

    split = open_split(prepared, "train")
    items = load_metadata(split)
    tokenizer = write_synthetic_tokenizer(prepared.parent / "tokenizer")

    def make(host: int = 0):
        return pipeline.make_train_dataset(items, pipeline.tokenize_captions(items, tokenizer, 16),
                                           global_batch_size=4, seed=7, process_index=host, process_count=2,
                                           image=pipeline.ImageSettings(size=16, train_crop="center"),
                                           stream=shards.ShardStream(split, cycle=3, window=5))

    reference = make()
    batches = [next(reference) for _ in range(10)]  # 7 steps an epoch: into the second epoch
    resumed = make()
    resumed.restore({**resumed.state(), "position": 3 * 2})
    for expected in batches[3:]:
        got = next(resumed)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])
    assert resumed.state() == reference.state()
    records_with_bytes = shards.load_shards(prepared, "train")
    order = reference.order(0)
    pixels = {int(index): image for indices, batch in pipeline.decoded_eval_images(records_with_bytes, image_size=16,
                                                                                   batch_size=8)
              for index, image in zip(indices, batch)}
    for row, index in enumerate(order[:2]):
        np.testing.assert_allclose(batches[0]["pixel_values"][row], pixels[int(index)], atol=1e-6)


def one_line_error(call) -> str:
    with pytest.raises(ShardError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_broken_prepared_folders_fail_in_one_typed_line(source, tmp_path):
    output = tmp_path / "shards"
    prepare_shards(source, output)
    manifest = json.loads((output / "manifest.json").read_text())

    shard = output / manifest["splits"]["train"]["shards"][2]["name"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    assert "truncated" in one_line_error(lambda: open_split(output, "train"))
    assert str(shard) in one_line_error(lambda: shards.load_shards(output, "train"))
    from medclip.training.arguments import DataArguments
    from medclip.training.data_feed import prepared_train
    from medclip.training.errors import DataError

    with pytest.raises(DataError, match="truncated") as caught:  # the trainer's exit 3, before training
        prepared_train(DataArguments(data_dir=str(output)))
    assert "\n" not in str(caught.value)
    shard.write_bytes(data)

    (output / manifest["splits"]["train"]["shards"][5]["name"]).unlink()
    assert "missing" in one_line_error(lambda: open_split(output, "train"))

    (output / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    assert "version 99" in one_line_error(lambda: open_split(output, "train"))
    (output / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    assert "not a medclip-shards manifest" in one_line_error(lambda: read_manifest(output))
    (output / "manifest.json").write_text(json.dumps(manifest))
    assert "no split 'validation'" in one_line_error(lambda: open_split(output, "validation"))


def test_prepare_refuses_jsonl_output_for_a_non_roco_source(source, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        prepare.main(["--source", str(source), "--output_dir", str(tmp_path / "o")])
    assert exit_.value.code == 2
    assert "--format shards" in capsys.readouterr().err


# 500 real ROCO test pairs beside the repository, as tests/data finds them
ROCO_SAMPLE = Path(os.environ.get("MEDCLIP_ROCO_SAMPLE",
                                  Path(__file__).resolve().parents[2] / "shared" / "roco-sample"))


@pytest.mark.skipif(not (ROCO_SAMPLE / "data" / "test").is_dir(), reason="no ROCO sample (set MEDCLIP_ROCO_SAMPLE)")
def test_real_roco_sample_round_trips(tmp_path):
    from medclip.data.sources.roco import load_roco

    root = str(ROCO_SAMPLE)
    prepare_shards_args = ["--source", root, "--output_dir", str(tmp_path), "--format", "shards", "--shard_size",
                           "128", "--no_progress", "--no_verify_decode"]
    assert prepare.main(prepare_shards_args) == 0
    expected = {record.id: record for record in load_roco(root, "test", counter=DropCounter())}
    got = shards.load_shards(tmp_path, "test")
    assert sorted(record.id for record in got) == sorted(expected)
    assert all(record.image == Path(expected[record.id].image).read_bytes() for record in got[:50])


def check_feed_resume(prepared, output_dir: Path) -> None:
    """The trainer's data feed on `--data_dir PREPARED` streams the shards (no validation split prepared: no
    eval set); a feed restored from another's saved state yields the batches the first one yields next."""
    from types import SimpleNamespace

    from medclip.training.arguments import DataArguments, TrainingArguments
    from medclip.training.data_feed import build_data

    tokenizer = write_synthetic_tokenizer(output_dir / "tokenizer")
    model_config = SimpleNamespace(vision_config=SimpleNamespace(image_size=16), image_preprocess=None)

    def feed():
        return build_data(DataArguments(data_dir=str(prepared), max_seq_length=16),
                          TrainingArguments(output_dir=str(output_dir), do_train=True, per_device_train_batch_size=4,
                                            seed=3),
                          tokenizer, model_config, output_dir, num_devices=1)

    first = feed()
    assert first.train.stream is not None and first.eval is None and first.steps_per_epoch == (N - 1) // 4
    for _ in range(5):
        next(first.train)
    state = first.train_state()
    assert state["positions"] == [20] and "order=shards" in state["fingerprint"]
    expected = [next(first.train) for _ in range(4)]  # into the second epoch
    second = feed()
    second.restore_train(state)
    for batch in expected:
        got = next(second.train)
        for key in batch:
            np.testing.assert_array_equal(got[key], batch[key])
    ids = first.train_ids(0, 8)
    assert len(set(ids)) == 8 and set(ids) <= {record.id for record in first.train.items}


def test_trainer_feed_streams_a_prepared_data_dir_and_resumes(prepared, tmp_path):
    check_feed_resume(prepared, tmp_path)


def test_trainer_refuses_flags_that_need_the_records_in_memory(prepared, tmp_path):
    from medclip.training.arguments import DataArguments
    from medclip.training.config_check import ConfigError
    from medclip.training.data_feed import prepared_train

    with pytest.raises(ConfigError, match="--max_train_samples does not apply to sharded records"):
        prepared_train(DataArguments(data_dir=str(prepared), max_train_samples=8))


def test_prepare_from_a_tfds_dataset_writes_its_examples(tmp_path, capsys):
    """`--source tfds:NAME/CONFIG --tfds_data_dir DIR`: every split of a TFDS dataset built locally with our ROCO
    builder, as shards holding the TFDS examples (ids, image bytes, captions, concepts, keywords); a dataset not
    prepared there, or no such dataset, is one line."""
    import tensorflow_datasets as tfds

    from medclip.data.sources import tfds_roco
    from tests.data import bad_files

    lines = [bad_files.good_line(f"ROCO_{i}", f"Chest radiograph number {i} showing a mass.") for i in range(1, 6)]
    images = {f"ROCO_{i}": bad_files.jpeg_bytes(seed=i) for i in range(1, 7)}
    for split in ("train", "validation"):
        bad_files.write_roco_tree(tmp_path / "roco", [*lines, bad_files.good_line("ROCO_6", "OPG.")], images,
                                  split=split)
    data_dir = tmp_path / "tfds"
    builder = tfds_roco.Roco(config="radiology", data_dir=str(data_dir))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "roco")))
    output = tmp_path / "shards"
    args = ["--source", "tfds:roco/radiology", "--output_dir", str(output), "--format", "shards", "--shard_size", "2",
            "--no_progress"]
    assert prepare.main([*args, "--tfds_data_dir", str(data_dir)]) == 0
    manifest = read_manifest(output)
    assert sorted(manifest["splits"]) == ["train", "validation"] and manifest["source"] == "tfds:roco/radiology"
    for split in ("train", "validation"):
        expected = {record.id: record for record in tfds_roco.load_tfds_roco(builder, split)}
        got = shards.load_shards(output, split)
        assert sorted(record.id for record in got) == sorted(expected) == [f"ROCO_{i}" for i in range(1, 6)]
        for record in got:
            source = expected[record.id]
            assert record.image == source.image == images[record.id]
            assert (record.captions, record.concepts, record.keywords) == (source.captions, source.concepts,
                                                                           source.keywords)
    capsys.readouterr()
    for source, data, expected in (("tfds:roco/radiology", tmp_path / "empty", "not prepared"),
                                   ("tfds:no_such_dataset_here", data_dir, "no such TFDS dataset")):
        args[1] = source
        assert prepare.main([*args, "--tfds_data_dir", str(data)]) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and source in err and expected in err, err
