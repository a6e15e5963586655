"""Training from loose image objects in a bucket (a local GCS emulator, tests/gcs_emulator.py): two pipelines alive
at once over the objects finish and give the local files' batches; the image checks read each object's head and
tail only, so one epoch reads each body once; start-up asks once whether the training source is prepared."""

from __future__ import annotations

import collections
import shutil
import sys
import threading
import traceback
import urllib.parse
from pathlib import Path

import numpy as np
import pytest

from tests import gcs_emulator

# A hang guard, not a timing check: the stall this catches never ended (15 min and more); a pass takes seconds.
HANG_S = 300


@pytest.fixture(scope="module")
def bucket():
    with gcs_emulator.running_emulator() as url:
        yield url


@pytest.fixture
def requests(monkeypatch):
    """Every request gcsfs sends, as (method, path with its arguments, Range header or None)."""
    import gcsfs

    sent: list[tuple[str, str, str | None]] = []
    original = gcsfs.GCSFileSystem._call

    async def counted(self, method, path, *args, **kwargs):
        where = urllib.parse.unquote(path.format(*args) if args and "{}" in path else path)
        sent.append((method, where, (kwargs.get("headers") or {}).get("Range")))
        return await original(self, method, path, *args, **kwargs)

    monkeypatch.setattr(gcsfs.GCSFileSystem, "_call", counted)
    return sent


def _media_reads(sent, name_part: str) -> collections.Counter:
    """Object -> (whole reads, ranged reads) among the media downloads of objects whose name holds `name_part`."""
    reads = collections.Counter()
    for method, path, byte_range in sent:
        if method == "GET" and "alt=media" in path and name_part in path:
            name = path.split("/o/", 1)[1].split("?", 1)[0]
            reads[(name, "range" if byte_range else "whole")] += 1
    return reads


def _jsonl_in_bucket(tmp_path: Path, bucket: str, n: int, image_size: int, folder: str) -> tuple[Path, str]:
    from medclip import storage
    from medclip.data.synthetic import write_synthetic_dataset

    local = write_synthetic_dataset(tmp_path / folder, n, seed=5, image_size=image_size, image_format="jpeg",
                                    name="train")
    storage.upload_folder(local.parent, f"{bucket}/{folder}")
    return local, f"{bucket}/{folder}/{local.name}"


def _finishes(work, what: str):
    """Runs `work` on a thread; fails with every thread's stack when it has not returned in HANG_S."""
    result, errors = [], []
    worker = threading.Thread(target=lambda: _capture(work, result, errors), daemon=True)
    worker.start()
    worker.join(HANG_S)
    if worker.is_alive():
        stacks = "\n".join(f"--- thread {ident}\n{''.join(traceback.format_stack(frame))}"
                           for ident, frame in sys._current_frames().items())
        pytest.fail(f"{what} did not finish in {HANG_S} s; stacks:\n{stacks}")
    if errors:
        raise errors[0]
    return result[0]


def _collect_garbage_on_fsspecs_thread() -> None:
    """A garbage collection on fsspec's IO thread, as any allocation there may start one."""
    import gc

    from fsspec.asyn import get_loop, sync

    async def collect():
        gc.collect()

    sync(get_loop(), collect)


def _capture(work, result, errors):
    try:
        result.append(work())
    except BaseException as error:  # re-raised on the test's thread
        errors.append(error)


def test_two_pipelines_over_bucket_objects_alive_at_once_finish_with_the_local_batches(tmp_path, bucket):
    from medclip.data import pipeline
    from medclip.data.records import DropCounter
    from medclip.data.sources.auto import load_records
    from medclip.data.synthetic import write_synthetic_tokenizer

    local_jsonl, remote_jsonl = _jsonl_in_bucket(tmp_path, bucket, 24, 40, "two")
    tokenizer = write_synthetic_tokenizer(tmp_path / "tok")
    remote = load_records(remote_jsonl, counter=DropCounter())
    local = load_records(str(local_jsonl), counter=DropCounter())
    assert len(remote) == len(local) == 24 and all(r.image.startswith(bucket) for r in remote)

    def train(items, counter=None):
        return pipeline.make_train_dataset(items, pipeline.tokenize_captions(items, tokenizer, 16),
                                           global_batch_size=8, seed=1, process_index=0, process_count=1,
                                           image=pipeline.ImageSettings(size=32), threads=2, counter=counter)

    def both_alive():
        dropped = train(remote)
        next(dropped)  # prefetching in the background when dropped
        del dropped
        _collect_garbage_on_fsspecs_thread()  # where the stall was: an iterator freed there waited for itself
        counter = DropCounter()
        first, second = train(remote, counter), train(remote, counter)
        batches = [next(first)]  # `first` keeps prefetching in the background while `second` runs
        batches += [next(second) for _ in range(6)]  # two epochs
        evaluation = pipeline.make_eval_dataset(remote, pipeline.tokenize_captions(remote, tokenizer, 16),
                                                global_batch_size=8, image=pipeline.ImageSettings(size=32),
                                                process_index=0, process_count=1)
        batches += list(evaluation) + [next(first) for _ in range(2)]
        return batches, counter

    batches, counter = _finishes(both_alive, "two pipelines over bucket objects")
    reference, other = train(local), train(local)
    expected = [next(reference)] + [next(other) for _ in range(6)]
    expected += list(pipeline.make_eval_dataset(local, pipeline.tokenize_captions(local, tokenizer, 16),
                                                global_batch_size=8, image=pipeline.ImageSettings(size=32),
                                                process_index=0, process_count=1))
    expected += [next(reference) for _ in range(2)]
    assert len(batches) == len(expected) == 12 and counter.dropped == 0
    for got, want in zip(batches, expected):
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_an_object_that_goes_missing_is_a_counted_skip_and_the_order_holds(tmp_path, bucket):
    from medclip import storage
    from medclip.data import pipeline
    from medclip.data.records import DropCounter
    from medclip.data.sources.auto import load_records
    from medclip.data.synthetic import write_synthetic_tokenizer

    _, remote_jsonl = _jsonl_in_bucket(tmp_path, bucket, 16, 32, "gone")
    items = load_records(remote_jsonl, counter=DropCounter())
    tokenizer = write_synthetic_tokenizer(tmp_path / "tok")
    captions = pipeline.tokenize_captions(items, tokenizer, 16)
    storage.as_path(items[3].image).unlink()  # after the checks: the pipeline meets it
    counter = DropCounter()
    train = pipeline.make_train_dataset(items, captions, global_batch_size=8, seed=0, process_index=0,
                                        process_count=1, image=pipeline.ImageSettings(size=32), counter=counter)
    batches = _finishes(lambda: [next(train) for _ in range(2)], "a pipeline with a missing object")
    assert [len(b["input_ids"]) for b in batches] == [8, 8]
    assert counter.summary()["dropped_by_reason"] == {"corrupt_image": 1}, counter.summary()
    assert train.position == 17  # 16 delivered + 1 skipped: the next epoch starts where it should


def test_checks_read_heads_and_tails_so_an_epoch_reads_each_body_once(tmp_path, bucket, requests, monkeypatch):
    from medclip.data import image_checks, pipeline
    from medclip.data.records import DropCounter
    from medclip.data.sources.auto import load_records
    from medclip.data.synthetic import write_synthetic_tokenizer

    local_jsonl, remote_jsonl = _jsonl_in_bucket(tmp_path, bucket, 16, 64, "once")
    head = 1024  # the synthetic JPEGs are a few kB: a smaller head makes them "large" objects, read in part
    assert min(p.stat().st_size for p in local_jsonl.parent.rglob("*.jpg")) > head
    monkeypatch.setattr(image_checks, "_HEAD_BYTES", head)
    monkeypatch.setattr(image_checks, "_TAIL_BYTES", 256)
    requests.clear()
    items = load_records(remote_jsonl, counter=DropCounter())
    checked = _media_reads(requests, "once/images/")
    assert len(items) == 16 and len({name for name, _ in checked}) == 16
    assert set(checked.values()) == {2} and {kind for _, kind in checked} == {"range"}  # head + tail, no body
    ranges = {byte_range for method, path, byte_range in requests if "once/images/" in path}
    assert ranges == {f"bytes=0-{head - 1}", "bytes=-256"}

    tokenizer = write_synthetic_tokenizer(tmp_path / "tok")
    captions = pipeline.tokenize_captions(items, tokenizer, 16)
    requests.clear()
    evaluation = pipeline.make_eval_dataset(items, captions, global_batch_size=8, process_index=0, process_count=1,
                                            image=pipeline.ImageSettings(size=32))
    assert len(_finishes(lambda: list(evaluation), "an evaluation pass over bucket objects")) == 2
    # A pass over the data reads each body once, whole, in one request.
    assert _media_reads(requests, "once/images/") == collections.Counter({(name, "whole"): 1 for name, _ in checked})

    requests.clear()
    train = pipeline.make_train_dataset(items, captions, global_batch_size=8, seed=0, process_index=0,
                                        process_count=1, image=pipeline.ImageSettings(size=32), threads=2)
    _finishes(lambda: [next(train) for _ in range(2)], "an epoch over bucket objects")
    epoch = _media_reads(requests, "once/images/")  # prefetch may have begun the next epoch: no exact count
    assert {name for name, _ in epoch} == {name for name, _ in checked} and {kind for _, kind in epoch} == {"whole"}


def test_start_up_asks_once_whether_a_bucket_source_is_prepared(tmp_path, bucket, requests):
    from medclip import storage
    from medclip.data import shard_manifest
    from medclip.data.synthetic import write_synthetic_tokenizer
    from medclip.models.hybrid import HybridCLIPConfig
    from medclip.training.arguments import DataArguments, TrainingArguments
    from medclip.training.data_feed import PreparedSources, build_data, streams_train
    from tests.test_storage_gcs import _write_roco

    roco = _write_roco(tmp_path, n=16)
    for split in ("train", "validation"):
        shutil.copytree(roco / "data" / "test", roco / "data" / split)
    url = f"{bucket}/prepared-question/roco"
    storage.upload_folder(roco, url)

    def manifest_requests() -> int:
        return sum(shard_manifest.MANIFEST in path for _, path, _ in requests)

    requests.clear()
    assert not shard_manifest.is_prepared(url)
    one_question = manifest_requests()
    assert one_question >= 1

    requests.clear()
    data = DataArguments(data_dir=url, max_seq_length=16, preprocessing_num_workers=2)
    train = TrainingArguments(output_dir=str(tmp_path / "out"), do_train=True, do_eval=True,
                              per_device_train_batch_size=8, per_device_eval_batch_size=8)
    prepared = PreparedSources()
    assert not streams_train(data, prepared)  # the trainer's question (may it cache the image tower?) first
    feed = build_data(data, train, write_synthetic_tokenizer(tmp_path / "tok"), HybridCLIPConfig.tiny(),
                      tmp_path / "out", num_devices=1, prepared=prepared)
    assert feed.train.layout.num_records == 16 and feed.eval.num_examples == 16
    assert manifest_requests() == one_question  # train, validation, the loader and the trainer: one question


def test_a_process_training_from_bucket_objects_exits_with_its_iterator_alive(tmp_path, bucket):
    """The iterator is still prefetching when the script ends; freed during interpreter finalisation it would wait
    for fetches that need fsspec's IO thread, stopped by then, and the process would never exit; freed after
    gcsfs's exit finalizers, a fetch in flight never returned (1 exit in 16 under load). A hang prints the stacks."""
    import os
    import subprocess

    _, remote_jsonl = _jsonl_in_bucket(tmp_path, bucket, 16, 32, "exit")
    script = f"""
import faulthandler
faulthandler.dump_traceback_later({HANG_S - 60}, exit=True)
from medclip.data import pipeline
from medclip.data.records import DropCounter
from medclip.data.sources.auto import load_records
from medclip.data.synthetic import write_synthetic_tokenizer

items = load_records({remote_jsonl!r}, counter=DropCounter())
captions = pipeline.tokenize_captions(items, write_synthetic_tokenizer({str(tmp_path / "tok")!r}), 16)
train = pipeline.make_train_dataset(items, captions, global_batch_size=8, seed=0, process_index=0, process_count=1,
                                    image=pipeline.ImageSettings(size=32), threads=2)
print("batch", next(train)["pixel_values"].shape)
"""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=HANG_S,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "batch (8, 32, 32, 3)" in done.stdout


def test_read_many_reads_files_and_objects_alike_and_returns_errors_in_place(tmp_path, bucket):
    from medclip import storage

    local = tmp_path / "blob.bin"
    local.write_bytes(bytes(range(200)))
    url = f"{bucket}/many/blob.bin"
    storage.write_bytes(url, local.read_bytes())
    missing = [str(tmp_path / "none.bin"), f"{bucket}/many/none.bin"]
    paths = [str(local), url, *missing]
    for start, end, expected in ((None, None, bytes(range(200))), (10, 20, bytes(range(10, 20))),
                                 (-5, None, bytes(range(195, 200)))):
        found = storage.read_many(paths, start, end)
        assert found[:2] == [expected, expected], (start, end)
        assert [type(error) for error in found[2:]] == [storage.StorageError] * 2
        assert all(path in str(error) for path, error in zip(missing, found[2:]))
    assert storage.read_many([str(local), url], [0, 100], [3, 103]) == [bytes([0, 1, 2]), bytes([100, 101, 102])]


def test_a_shard_in_a_bucket_is_read_in_chunk_requests_and_every_record_checked(tmp_path, bucket, requests):
    """TFRecord frames are small reads: through gcsfs's file object each went round fsspec's IO loop; through
    `open_sequential` they come from chunk-sized ranged requests, and the records are the local file's."""
    from medclip import storage
    from medclip.data import shards
    from medclip.data.records import Record

    local = tmp_path / "x.tfrecord"
    import tensorflow as tf

    records = [Record(id=str(i), image=f"{i}.jpg", captions=[f"caption {i}"]) for i in range(40)]
    with tf.io.TFRecordWriter(str(local)) as writer:
        for i, record in enumerate(records):
            writer.write(shards.serialize(record, i, bytes([i % 256]) * (1000 + 37 * i)))
    url = f"{bucket}/sequential/x.tfrecord"
    storage.write_bytes(url, local.read_bytes())
    size = local.stat().st_size
    with storage.open_sequential(url, chunk=4096) as f:
        assert f.read(10) == local.read_bytes()[:10]
        f.seek(100, 1)
        assert f.read(5000) == local.read_bytes()[110:5110]
    requests.clear()
    pieces = []
    with storage.open_sequential(url, chunk=4096) as f:
        while piece := f.read(100):  # small reads, as TFRecord frames are read
            pieces.append(piece)
    assert b"".join(pieces) == local.read_bytes()
    assert _media_reads(requests, "sequential/") == {("sequential/x.tfrecord", "range"): -(-size // 4096)}
    assert list(shards.iter_serialized(url, 3, 30)) == list(shards.iter_serialized(str(local), 3, 30))
