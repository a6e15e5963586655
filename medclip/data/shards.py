"""Sharded records: any source written once as TFRecord shards plus a manifest, read back whole or as a stream.

    medclip prepare --source ROCO_OR_JSONL_OR_CSV_OR_HF --output_dir gs://bucket/roco-shards --format shards
    # -> {split}-00000.tfrecord ..., {split}-metadata.jsonl, manifest.json

Why. Reading 1.6M loose JPEGs from a bucket costs one request per image; a shard is read front to back in large
reads. The manifest names every shard with its example count, byte size and CRC32C, so a reader knows the split's
size (and the example index of every record) without scanning, and catches a missing or truncated shard (in a
bucket, any changed one) before training starts. The captions, concepts and ids are also written to one small
JSON-lines file per split: the trainer tokenises all captions once, as it does for any source, while the images
stream.

Layout. Example i of a split (its `index`) is the i-th record written; the writer shuffles the source's records
once (seeded) so that any contiguous range is a fair sample. Each shard holds consecutive indices.

Stream order (`ShardStream`), for `process_count` hosts: host h owns the contiguous index range
[h * N // P, (h + 1) * N // P), i.e. a list of (shard, rows) segments; each epoch permutes the host's segments
(seed, epoch, host), reads them `cycle` at a time interleaved (parallel reads), and permutes each run of `window`
consecutive examples of a group in memory. The whole order is a function of the manifest and (seed, epoch,
host), so `order` computes it without reading, and a stream started at a position skips whole groups unread and
re-reads at most one group up to that position. Every host yields the same `per_epoch` examples an epoch (the
pipeline's layout); a host's last few examples of an epoch beyond that are the ones it leaves out, a different
few each epoch.

Integrity. Every record read is checked against its TFRecord CRCs (by TensorFlow, or `record_frames` for a bucket
and the in-memory reader). A corrupt shard never surfaces as a DataLossError traceback nor as examples quietly
missing: the stream ends at the first record it cannot read and `ShardStream.raise_read_failure` (which the
training iterator calls when its stream ends) raises `CorruptShardError` naming the shard, the record and
`medclip verify-shards`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import tensorflow as tf

from medclip import storage
from medclip.data import records
from medclip.data.record_frames import crc32c_hex, read_records
from medclip.data.records import DropCounter, Record
from medclip.data.shard_manifest import VERIFY_COMMAND, CorruptShardError, ShardError, ShardSplit, open_split

DEFAULT_SHARD_SIZE = 1024
DEFAULT_CYCLE = 8  # shards read at once, interleaved
DEFAULT_WINDOW = 1024  # examples permuted together in memory
# Stands in the stream for a record that could not be read, followed by the shard's number: never the first byte of
# a serialized tf.train.Example (a protobuf field number is never 0).
_UNREAD = b"\x00"


# ------------------------------------------------------------------------------------------------- examples
def _bytes_list(values: Iterable[str | bytes]) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(
        value=[v if isinstance(v, bytes) else v.encode("utf-8") for v in values]))


def serialize(record: Record, index: int, image: bytes) -> bytes:
    feature = {
        "index": tf.train.Feature(int64_list=tf.train.Int64List(value=[index])),
        "id": _bytes_list([record.id]),
        "image": _bytes_list([image]),
        "captions": _bytes_list(record.captions),
        "concepts": _bytes_list(record.concepts),
        "keywords": _bytes_list(record.keywords),
        "semantic_types": _bytes_list(record.semantic_types),
        "concept_names": _bytes_list(record.concept_names),
        "source": _bytes_list([record.source]),
        "fields": _bytes_list([json.dumps(record.fields, ensure_ascii=False)]),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def parse(serialized: bytes) -> tuple[int, Record]:
    """(index, Record holding the image bytes) from one serialized example."""
    feature = tf.train.Example.FromString(serialized).features.feature

    def texts(name):
        return [v.decode("utf-8") for v in feature[name].bytes_list.value]

    record = Record(id=texts("id")[0], image=feature["image"].bytes_list.value[0], captions=texts("captions"),
                    concepts=texts("concepts"), keywords=texts("keywords"), semantic_types=texts("semantic_types"),
                    concept_names=texts("concept_names"), source=texts("source")[0],
                    fields=json.loads(texts("fields")[0]))
    return int(feature["index"].int64_list.value[0]), record


_GRAPH_FEATURES = {"index": tf.io.FixedLenFeature([], tf.int64), "image": tf.io.FixedLenFeature([], tf.string)}


def parse_in_graph(serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(index, encoded image) of one serialized example, inside the graph."""
    parsed = tf.io.parse_single_example(serialized, _GRAPH_FEATURES)
    return parsed["index"], parsed["image"]


def iter_serialized(path: str, start: int = 0, stop: int | None = None, size: int | None = None) -> Iterator[bytes]:
    """Rows [start, stop) of one TFRecord file (any path or URL, through medclip.storage), skipping earlier rows
    by seeking past them; each row read is checked against its CRCs (`CorruptShardError` names the row)."""
    with storage.open_sequential(path, size=size) as f:
        yield from read_records(f, path, start, stop)


def _readable_rows(path: str, start: int, stop: int, size: int) -> Iterator[bytes]:
    """Rows [start, stop) up to the first that cannot be read (the stream marks the rest unread)."""
    try:
        yield from iter_serialized(path, start, stop, size)
    except (ShardError, OSError):
        return


def load_shards(source: str | os.PathLike, split: str = "train", *, counter: DropCounter | None = None) -> list[Record]:
    """The whole split in memory (records holding their image bytes), in index order: for evaluation sets and
    the commands that take any source."""
    found = open_split(source, split)
    items = []
    for path, count in zip(found.paths, found.counts):
        rows = [parse(serialized)[1] for serialized in iter_serialized(path)]
        if len(rows) != count:
            raise ShardError(f"{path}: {len(rows)} examples, the manifest says {count}")
        items.extend(rows)
    if counter is not None:
        counter.kept += len(items)
    return items


# -------------------------------------------------------------------------------------------------- writing
def write_split(items: list[Record], folder: str | os.PathLike, split: str, *, counter: DropCounter,
                shard_size: int = DEFAULT_SHARD_SIZE, progress: bool = True) -> dict:
    """Writes `items` (already shuffled as wanted) as shards of `shard_size` examples and the split's metadata
    file; returns the split's manifest entry. An image that cannot be read is dropped and counted
    (`missing_file`), like any source's."""
    from tqdm import tqdm

    folder = os.fspath(folder)
    shards: list[dict] = []
    metadata: list[str] = []
    with tempfile.TemporaryDirectory(prefix="medclip-shards-") as tmp:
        writer, local = None, ""

        def close() -> None:
            writer.close()
            name = f"{split}-{len(shards):05d}.tfrecord"
            data = Path(local).read_bytes()
            storage.write_bytes(storage.join(folder, name), data)
            shards.append({"name": name, "examples": rows, "bytes": len(data), "crc32c": crc32c_hex(data)})

        rows = 0
        for record in tqdm(items, desc=f"{split} -> shards", unit="ex", disable=not progress):
            try:
                image = record.image if isinstance(record.image, bytes) else storage.read_bytes(record.image)
            except OSError as error:
                counter.drop(records.MISSING_FILE, record.source or record.id, storage.first_line(error))
                counter.kept -= 1
                continue
            if writer is None:
                local = os.path.join(tmp, "shard.tfrecord")
                writer, rows = tf.io.TFRecordWriter(local), 0
            index = len(metadata)
            writer.write(serialize(record, index, image))
            metadata.append(json.dumps({"index": index, "id": record.id, "captions": record.captions,
                                        "concepts": record.concepts, "keywords": record.keywords,
                                        "semantic_types": record.semantic_types,
                                        "concept_names": record.concept_names, "source": record.source,
                                        "fields": record.fields}, ensure_ascii=False))
            rows += 1
            if rows == shard_size:
                close()
                writer = None
        if writer is not None:
            close()
    meta_name = f"{split}-metadata.jsonl"
    storage.write_text(storage.join(folder, meta_name), "".join(line + "\n" for line in metadata))
    return {"total": len(metadata), "shards": shards, "metadata": meta_name, "drops": counter.summary()}


# ------------------------------------------------------------------------------------------------ streaming
@dataclasses.dataclass(frozen=True)
class Segment:
    shard: int
    start: int  # rows [start, stop) of the shard
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def host_segments(counts: tuple[int, ...], process_index: int, process_count: int) -> list[Segment]:
    """The shard rows holding host `process_index`'s index range [h * N // P, (h + 1) * N // P)."""
    total = int(sum(counts))
    begin, end = process_index * total // process_count, (process_index + 1) * total // process_count
    segments, offset = [], 0
    for shard, count in enumerate(counts):
        lo, hi = max(begin, offset), min(end, offset + count)
        if lo < hi:
            segments.append(Segment(shard, lo - offset, hi - offset))
        offset += count
    return segments


@dataclasses.dataclass(frozen=True)
class ShardStream:
    """A split's examples as a stream for one host (see the module docstring for the order)."""

    split: ShardSplit
    cycle: int = DEFAULT_CYCLE
    window: int = DEFAULT_WINDOW
    # Shards (numbers) whose unread records ended a stream, in the order met; filled while streaming.
    unread: list[int] = dataclasses.field(default_factory=list, compare=False, repr=False)

    def raise_read_failure(self) -> None:
        """After a stream ended early: the first shard that ended it, read again with its CRCs checked, raises
        `CorruptShardError` naming the bad record (or `ShardError` when it cannot be read at all). Nothing when
        no shard ended a stream."""
        if not self.unread:
            return
        path = self.split.paths[self.unread[0]]
        try:
            count = sum(1 for _ in iter_serialized(path))
        except CorruptShardError:
            raise
        except OSError as error:
            raise ShardError(f"{path}: cannot be read while streaming ({storage.first_line(error)})") from None
        raise ShardError(f"{path}: could not be read while streaming, though its {count} records check now; run "
                         f"`{VERIFY_COMMAND} {self.split.folder}`")

    def groups(self, seed: int, epoch: int, process_index: int, process_count: int) -> list[list[Segment]]:
        segments = host_segments(self.split.counts, process_index, process_count)
        permutation = np.random.default_rng([seed, epoch, process_index, 1]).permutation(len(segments))
        ordered = [segments[i] for i in permutation]
        return [ordered[i : i + self.cycle] for i in range(0, len(ordered), self.cycle)]

    def _window_permutation(self, seed: int, epoch: int, process_index: int, group: int, window: int,
                            size: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch, process_index, 2, group, window]).permutation(size)

    def group_order(self, seed: int, epoch: int, process_index: int, group_id: int,
                    group: list[Segment]) -> np.ndarray:
        """Global indices of one group in stream order: its segments read round-robin (what a deterministic
        interleave of them yields), then each window permuted."""
        offsets = self.split.offsets
        rows = np.concatenate([np.arange(s.size) for s in group])
        slots = np.concatenate([np.full(s.size, i) for i, s in enumerate(group)])
        indices = np.concatenate([offsets[s.shard] + np.arange(s.start, s.stop) for s in group])
        interleaved = indices[np.lexsort((slots, rows))]
        out = []
        for w, begin in enumerate(range(0, len(interleaved), self.window)):
            chunk = interleaved[begin : begin + self.window]
            out.append(chunk[self._window_permutation(seed, epoch, process_index, group_id, w, len(chunk))])
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def order(self, seed: int, epoch: int, process_index: int, process_count: int, per_epoch: int) -> np.ndarray:
        """This host's global example indices of `epoch`, in stream order: (per_epoch,) int64."""
        groups = self.groups(seed, epoch, process_index, process_count)
        full = np.concatenate([self.group_order(seed, epoch, process_index, g, group)
                               for g, group in enumerate(groups)])
        if len(full) < per_epoch:
            raise ShardError(f"host {process_index} holds {len(full)} examples, fewer than the {per_epoch} an epoch "
                             "needs")
        return full[:per_epoch].astype(np.int64)

    def dataset(self, seed: int, per_epoch: int, process_index: int, process_count: int, position: int,
                epochs: int) -> tf.data.Dataset:
        """(position, epoch, serialized example) from stream `position` on; groups before the position's are not
        read, the position's group is read up to it and skipped."""
        start_epoch, offset = divmod(position, per_epoch)
        paths, sizes = list(self.split.paths), self.split.sizes  # sizes: the manifest's, checked at start-up
        local = not any(storage.is_url(p) for p in paths)
        path_table = tf.constant(paths)

        def plan(epoch, begin):
            groups = self.groups(seed, int(epoch), process_index, process_count)
            sizes = np.array([sum(s.size for s in g) for g in groups], np.int64)
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            first = int(np.searchsorted(starts, int(begin), side="right") - 1)
            table = np.zeros((len(groups) - first, self.cycle, 3), np.int64)  # empty rows pad a short group
            for row, group in enumerate(groups[first:]):
                for slot, s in enumerate(group):
                    table[row, slot] = (s.shard, s.start, s.stop)
            # One flat array: a numpy_function with several outputs crashes inside tf.data functions (TF 2.21).
            return np.concatenate([[int(begin) - starts[first], first, len(groups)], table.ravel()]).astype(np.int64)

        def read_segment(shard, start, stop):
            """Exactly the segment's stop - start rows: a record that cannot be read (TensorFlow's DataLossError,
            which also ends its file) and every row after it come out as `_UNREAD` + the shard's number."""
            if local:
                # ignore_errors retries a file that cannot be opened forever: such a file is left out instead.
                openable = tf.numpy_function(lambda s: os.access(paths[int(s)], os.R_OK), [shard], tf.bool)
                files = tf.boolean_mask(tf.reshape(tf.gather(path_table, shard), [1]), tf.reshape(openable, [1]))
                rows = tf.data.TFRecordDataset(files, buffer_size=1 << 22).ignore_errors()
                rows = rows.skip(start).take(stop - start)
            else:
                rows = tf.data.Dataset.from_generator(
                    lambda s, a, b: _readable_rows(paths[int(s)], int(a), int(b), sizes[int(s)]),
                    args=(shard, start, stop),
                    output_signature=tf.TensorSpec([], tf.string))
            unread = tf.strings.join([_UNREAD, tf.strings.as_string(shard)])
            return rows.concatenate(tf.data.Dataset.from_tensors(unread).repeat(stop - start)).take(stop - start)

        def note_unread(serialized):
            self.unread.append(int(np.asarray(serialized).item()[len(_UNREAD):]))
            return np.False_

        def readable(position, epoch, serialized):
            """False at the first unread record, which ends the stream (noted for `raise_read_failure`)."""
            return tf.cond(tf.strings.substr(serialized, 0, len(_UNREAD)) == _UNREAD,
                           lambda: tf.reshape(tf.numpy_function(note_unread, [serialized], tf.bool), []),
                           lambda: tf.constant(True))

        def permute(key, window):
            epoch, group = key[0], key[1]
            number, examples = window
            size = tf.shape(examples, out_type=tf.int64)[0]
            permutation = tf.numpy_function(
                lambda e, g, w, n: self._window_permutation(seed, int(e), process_index, int(g), int(w), int(n)),
                [epoch, group, number, size], tf.int64, stateful=False)
            return tf.data.Dataset.from_tensor_slices(tf.gather(examples, permutation))

        def group_stream(epoch, group, rows):
            reads = tf.data.Dataset.from_tensor_slices((rows[:, 0], rows[:, 1], rows[:, 2])).interleave(
                read_segment, cycle_length=self.cycle, block_length=1, num_parallel_calls=self.cycle,
                deterministic=True)
            windows = reads.batch(self.window).enumerate()
            key = tf.data.Dataset.from_tensors(tf.stack([epoch, group])).repeat()
            return tf.data.Dataset.zip((key, windows)).flat_map(permute)

        def epoch_stream(epoch):
            begin = tf.where(epoch == start_epoch, tf.constant(offset, tf.int64), tf.constant(0, tf.int64))
            packed = tf.numpy_function(plan, [epoch, begin], tf.int64, stateful=False)
            packed.set_shape([None])
            skip, group_ids = packed[0], tf.range(packed[1], packed[2])
            table = tf.reshape(packed[3:], [-1, self.cycle, 3])
            groups = tf.data.Dataset.from_tensor_slices((tf.fill(tf.shape(group_ids), epoch), group_ids, table))
            examples = groups.flat_map(group_stream).skip(skip).take(per_epoch - begin)
            positions = tf.data.Dataset.range(epoch * per_epoch + begin, (epoch + 1) * per_epoch)
            return tf.data.Dataset.zip((positions, tf.data.Dataset.from_tensors(epoch).repeat(), examples))

        return tf.data.Dataset.range(start_epoch, epochs).flat_map(epoch_stream).take_while(readable)
