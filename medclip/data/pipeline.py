"""The tf.data input pipeline: records -> numpy batches ready to be sharded on the device mesh.

    captions = tokenize_captions(records, tokenizer, max_seq_length=128)
    train = make_train_dataset(records, captions, global_batch_size=256, seed=0, image=ImageSettings(size=224))
    batch = next(train)        # {"pixel_values": (B, H, W, 3) float32, "input_ids": (B, L) int32,
                               #  "attention_mask": (B, L) int32}; B = global_batch_size / process_count
    state = train.state()      # save with the model checkpoint; `train.restore(state)` resumes exactly there
    for batch in make_eval_dataset(...): ...   # the same keys plus "mask": (B,) bool, False on padding

Per-example extras (a second text, concept sets, a locked tower's cached features...) are `fields`
(medclip.data.fields): each adds its batch keys, gathered per record or per caption row.

Order. Every epoch is a permutation of all records drawn from (seed, epoch); it is cut into global batches (the
last partial one is dropped) and each process takes its slice of every global batch, so the data seen does not
depend on the number of processes. Each process walks a stream of positions (epoch * per_epoch + offset); the
position after the last delivered element is the iterator state, so restoring skips to it without decoding
anything. Crops and caption choice are seeded per (seed, epoch, record): parallelism does not change them.
Sharded records (`stream=`, medclip.data.shards) keep the positions and the seeding but draw the order from the
stream (each host its own range of the examples, read shard by shard), so there the data a host sees depends on
the number of processes; restoring skips whole groups of shards unread and re-reads (never decodes) at most one
group up to the position.

Eval. Records in order, padded with masked copies of record 0 to a whole number of global batches, so every
record is counted exactly once across processes; every process yields the same number of batches.

Text. Captions are tokenised once, in one vectorised call of the fast tokenizer, padded/truncated to
`max_seq_length`; the graph only gathers rows.

Images in a bucket. Objects are fetched `_FETCH_CHUNK` at a time, concurrently on fsspec's IO loop, from one Python
call per chunk (a few chunks in flight), not by one blocking call per image, in the same order.

Bad images. Sources check images before they get here (`medclip.data.image_checks`). An image that still fails to
decode in the graph is skipped and counted in `counter` as `corrupt_image` with its record's file and line (strict
mode raises `DataError` instead): elements carry their stream position, and gaps are accounted for in Python.

Horizontal flips are off by default: radiology captions say "left" and "right", and a flip would make them wrong.
"""

from __future__ import annotations

import atexit
import dataclasses
import math
import weakref
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from medclip.data import images, records
from medclip.data.fields import Field, check_fields, tokenize
from medclip.data.image_checks import encoded_images
from medclip.data.records import DropCounter, Record
from medclip.data.shards import ShardStream, parse_in_graph
from medclip.models.preprocess import Preprocess
from medclip.storage import is_url

_INFINITE_EPOCHS = 2**40


TRAIN_CROPS = ("random", "center")


@dataclasses.dataclass(frozen=True)
class Captions:
    """All captions of all records tokenised once: record i owns rows first[i] : first[i] + count[i]."""

    input_ids: np.ndarray  # (num_captions, max_seq_length) int32
    attention_mask: np.ndarray  # (num_captions, max_seq_length) int32
    first: np.ndarray  # (num_records,) int64
    count: np.ndarray  # (num_records,) int64


def tokenize_captions(items: list[Record], tokenizer, max_seq_length: int) -> Captions:
    """One batched call of the (Rust) fast tokenizer for every caption of every record."""
    texts = [caption for record in items for caption in record.captions]
    count = np.array([len(record.captions) for record in items], np.int64)
    if (count == 0).any():
        raise ValueError(f"record {items[int(np.argmin(count))].id} has no caption; load records through a source")
    input_ids, attention_mask = tokenize(tokenizer, texts, max_seq_length)
    return Captions(input_ids=input_ids, attention_mask=attention_mask,
                    first=np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64), count=count)


@dataclasses.dataclass(frozen=True)
class ImageSettings:
    """How images become pixels: size and normalisation (`config.image_preprocess`; None: CLIP's), and for
    training the random resized crop's scale, the optional flip and the crop ("center": evaluation's resize +
    centre crop, no augmentation but the flip)."""

    size: int = 224
    preprocess: Preprocess | None = None
    crop_scale: tuple[float, float] = images.DEFAULT_CROP_SCALE
    hflip: bool = False
    train_crop: str = "random"

    def __post_init__(self):
        if self.train_crop not in TRAIN_CROPS:
            raise ValueError(f"train_crop must be one of {TRAIN_CROPS}, not {self.train_crop!r}")
        object.__setattr__(self, "crop_scale", tuple(self.crop_scale))


def _gather_fields(fields: Sequence[Field]) -> Callable[[tf.Tensor, tf.Tensor], dict[str, tf.Tensor]]:
    """(record index, caption row) -> every field's values, in the graph. A field's `valid` False makes the element
    fail, and `ignore_errors` skip it as it skips an undecodable image."""
    per_record = {key: tf.constant(array) for field in fields for key, array in field.per_record.items()}
    per_caption = {key: tf.constant(array) for field in fields for key, array in field.per_caption.items()}
    valid = [tf.constant(field.valid) for field in fields if field.valid is not None]

    def gather(index, row):
        values = {**{key: array[index] for key, array in per_record.items()},
                  **{key: array[row] for key, array in per_caption.items()}}
        if not valid:
            return values
        checks = [tf.debugging.assert_equal(v[index], True, message="image could not be decoded") for v in valid]
        with tf.control_dependencies(checks):
            return {key: tf.identity(value) for key, value in values.items()}

    return gather


def vision_image_size(config) -> int:
    """The input resolution of a vision config (or of a dual-encoder config's `vision_config`)."""
    config = getattr(config, "vision_config", config)
    return int(config["image_size"] if isinstance(config, dict) else config.image_size)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How records map onto batches for one process."""

    num_records: int
    global_batch_size: int
    process_index: int
    process_count: int

    @property
    def batch_size(self) -> int:  # per process
        return self.global_batch_size // self.process_count

    @property
    def steps_per_epoch(self) -> int:
        return self.num_records // self.global_batch_size

    @property
    def per_epoch(self) -> int:  # elements per epoch for this process
        return self.steps_per_epoch * self.batch_size

    def process_slice(self, global_order: np.ndarray) -> np.ndarray:
        """This process's slice of every global batch, flattened: (num_batches * batch_size,)."""
        batches = global_order.reshape(-1, self.global_batch_size)
        start = self.process_index * self.batch_size
        return batches[:, start : start + self.batch_size].reshape(-1)


def make_layout(num_records: int, global_batch_size: int, process_index: int | None,
                process_count: int | None) -> Layout:
    """Checks the batch against the processes (and, when asked of JAX, the local devices)."""
    local_devices = None
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
        local_devices = jax.local_device_count()
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} must divide evenly over {process_count} processes")
    layout = Layout(num_records, global_batch_size, process_index, process_count)
    if local_devices and layout.batch_size % local_devices:
        raise ValueError(f"per-process batch {layout.batch_size} must divide evenly over {local_devices} local devices")
    return layout


def epoch_order(seed: int, epoch: int, layout: Layout) -> np.ndarray:
    """Record indices this process reads in `epoch`, in order: (layout.per_epoch,) int64."""
    permutation = np.random.default_rng([seed, epoch]).permutation(layout.num_records)
    return layout.process_slice(permutation[: layout.steps_per_epoch * layout.global_batch_size]).astype(np.int64)


def _image_reader(items: list[Record]) -> Callable[[tf.Tensor], tf.Tensor]:
    """record index -> encoded image bytes, inside the graph, for records whose images are local files (read by
    TF) or bytes (images from a dataset, CMYK JPEGs converted to RGB by the image checks: served from memory).
    Objects in a bucket are fetched by `_with_fetched_images` instead."""
    in_memory = np.array([isinstance(record.image, bytes) for record in items], bool)
    paths = tf.constant(["" if held else record.image for record, held in zip(items, in_memory)], tf.string)
    if not in_memory.any():
        return lambda index: tf.io.read_file(tf.gather(paths, index))

    def from_memory(index):
        contents = tf.numpy_function(lambda i: items[int(i)].image, [index], tf.string, stateful=False)
        contents.set_shape([])
        return contents

    if in_memory.all():
        return from_memory
    held = tf.constant(in_memory)
    return lambda index: tf.cond(tf.gather(held, index), lambda: from_memory(index),
                                 lambda: tf.io.read_file(tf.gather(paths, index)))


def _in_bucket(items: list[Record]) -> bool:
    return any(isinstance(record.image, str) and is_url(record.image) for record in items)


# Objects fetched per Python call, concurrently, and calls in flight: up to 4 x 32 requests open, while TF decodes.
_FETCH_CHUNK = 32
_FETCHES_IN_FLIGHT = 4


def _with_fetched_images(dataset: tf.data.Dataset, items: list[Record], index_at: int) -> tf.data.Dataset:
    """Appends to each element (a tuple whose column `index_at` is the record index) its record's encoded image.
    For records with images in a bucket: `_FETCH_CHUNK` elements at a time, one `encoded_images` call each, which
    requests the objects concurrently on fsspec's IO loop; the order is kept. An object that cannot be read gives
    b"", which fails to decode and is counted like a bad file."""

    def fetch(indices: np.ndarray) -> np.ndarray:
        return np.array(encoded_images([items[int(i)].image for i in indices]), dtype=object)

    def fetch_chunk(*columns):
        contents = tf.numpy_function(fetch, [columns[index_at]], tf.string, stateful=False)
        contents.set_shape(columns[index_at].shape)
        return (*columns, contents)

    chunks = dataset.batch(_FETCH_CHUNK).map(fetch_chunk, num_parallel_calls=_FETCHES_IN_FLIGHT, deterministic=True)
    return chunks.unbatch()


def _options(threads: int | None = None) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    if threads:  # default: TF's shared pool, one thread per core
        options.threading.private_threadpool_size = threads
    # One thread per op, many elements in parallel: measured faster than letting ops spawn their own threads.
    options.threading.max_intra_op_parallelism = 1
    return options


def build_train_dataset(items: list[Record], captions: Captions, layout: Layout, *, seed: int,
                        image: ImageSettings = ImageSettings(), fields: Sequence[Field] = (), position: int = 0,
                        threads: int | None = None, stream: ShardStream | None = None) -> tf.data.Dataset:
    """The tf.data graph behind `TrainIterator`, starting at stream `position` (skipping costs no decoding).
    A field that `replaces_pixels` (cached image features) stands in for the image, which is then not decoded.
    With `stream` the images (and each element's record index) come from sharded records in the stream's order
    (`medclip.data.shards`) instead of `epoch_order` over `items`, whose text the batches still take."""
    if stream is not None and any(field.replaces_pixels for field in fields):
        raise ValueError("cached image features need every image up front; sharded records stream them")
    per_epoch = layout.per_epoch
    start_epoch, offset = divmod(position, per_epoch)

    def epoch_elements(epoch):
        order = tf.numpy_function(lambda e: epoch_order(seed, int(e), layout), [epoch], tf.int64, stateful=False)
        order.set_shape([per_epoch])
        positions = epoch * per_epoch + tf.range(per_epoch, dtype=tf.int64)
        return tf.data.Dataset.from_tensor_slices((positions, tf.fill([per_epoch], epoch), order))

    decode = not any(field.replaces_pixels for field in fields)
    fetched = stream is None and decode and _in_bucket(items)
    read_image = None if fetched else _image_reader(items)
    input_ids, attention_mask = tf.constant(captions.input_ids), tf.constant(captions.attention_mask)
    first, count = tf.constant(captions.first), tf.constant(captions.count)
    extras = _gather_fields(fields)

    def pixels(contents, image_seed):
        if image.train_crop == "random":
            return images.train_image(contents, image_seed, image.size, image.crop_scale, image.hflip,
                                      image.preprocess)
        pixels = images.eval_image(contents, image.size, image.preprocess)
        return images.random_flip(pixels, image_seed) if image.hflip else pixels

    def load(position, epoch, index, contents=None):
        element_seed = tf.stack([tf.constant(seed, tf.int64), epoch * layout.num_records + index])
        caption_seed, image_seed = tf.unstack(tf.random.experimental.stateless_split(element_seed, 2))
        pick = tf.random.stateless_uniform([], caption_seed, maxval=count[index], dtype=tf.int64)
        row = first[index] + pick
        element = {"input_ids": input_ids[row], "attention_mask": attention_mask[row], "position": position,
                   **extras(index, row)}
        if decode:
            element["pixel_values"] = pixels(read_image(index) if contents is None else contents, image_seed)
        return element

    if stream is None:
        dataset = tf.data.Dataset.range(start_epoch, _INFINITE_EPOCHS).flat_map(epoch_elements).skip(offset)
        if fetched:
            dataset = _with_fetched_images(dataset, items, index_at=2)
        dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
    else:
        def load_streamed(position, epoch, serialized):
            return load(position, epoch, *parse_in_graph(serialized))

        dataset = stream.dataset(seed, per_epoch, layout.process_index, layout.process_count, position,
                                 _INFINITE_EPOCHS)
        dataset = dataset.map(load_streamed, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
    dataset = dataset.batch(layout.batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return dataset.with_options(_options(threads))


def decoded_eval_images(items: list[Record], *, image_size: int, batch_size: int,
                        preprocess: Preprocess | None = None, threads: int | None = None
                        ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every record's image as evaluation (and `--train_crop center`) decodes it, in batches of (record indices,
    pixels (n, size, size, 3) float32); records whose image does not decode are left out of the indices (the
    caller counts them: the training pipeline skips and reports them when it reaches them)."""
    fetched = _in_bucket(items)
    read_image = None if fetched else _image_reader(items)

    def load(index, contents=None):
        return index, images.eval_image(read_image(index) if contents is None else contents, image_size, preprocess)

    dataset = tf.data.Dataset.range(len(items))
    if fetched:
        dataset = _with_fetched_images(dataset.map(lambda index: (index,)), items, index_at=0)
    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
    dataset = dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE).with_options(_options(threads))
    yield from dataset.as_numpy_iterator()


class _GapAccounting:
    """Counts the elements the graph skipped (undecodable images), once per record. `record_at` (stream position
    -> record index, None for padding) is passed per call, not kept: a bound method of the iterator kept here
    would put the iterator in a reference cycle, and a TF iterator freed later by the cyclic collector, on
    whichever thread it runs (fsspec's IO thread included), waits there for in-flight fetches that wait for that
    thread: the pipeline over a bucket hung."""

    def __init__(self, items: list[Record], counter: DropCounter):
        self.items, self.counter = items, counter
        self.reported: set[int] = set()

    def check(self, expected_start: int, positions: np.ndarray, record_at: Callable[[int], int | None]) -> None:
        """`positions` (sorted, real elements only) should be exactly expected_start, expected_start + 1, ..."""
        if positions.size == 0 or positions[-1] - expected_start + 1 == positions.size:
            return
        missing = np.setdiff1d(np.arange(expected_start, positions[-1] + 1), positions)
        for position in missing:
            self.report(int(position), record_at)

    def report(self, position: int, record_at: Callable[[int], int | None]) -> None:
        index = record_at(position)
        if index is None or index in self.reported:
            return
        self.reported.add(index)
        record = self.items[index]
        self.counter.drop(records.CORRUPT_IMAGE, record.source or record.id,
                          f"image {record.image if isinstance(record.image, str) else 'bytes'} could not be read or "
                          "decoded in the input pipeline; skipped")


# Train iterators alive, released at exit (below).
_LIVE: weakref.WeakSet[TrainIterator] = weakref.WeakSet()


def _release_iterators() -> None:
    """Drops the TF iterators of live train iterators while the interpreter still runs every thread: one freed
    during finalisation waits for its in-flight fetches, which need fsspec's IO thread, stopped by then (a
    process training from a bucket would hang at exit)."""
    for live in list(_LIVE):
        live.close()


def _release_first_at_exit() -> None:
    """(Re-)registers `_release_iterators` as the last exit hook, so that it runs first (atexit is last in,
    first out): before gcsfs's exit finalizers close the sessions an in-flight fetch is still using (that fetch
    then never returned and the TF iterator's destructor waited for it: 1 exit in 16 hung under load)."""
    atexit.unregister(_release_iterators)
    atexit.register(_release_iterators)


class TrainIterator(Iterator[dict[str, np.ndarray]]):
    """Endless training batches with an exact, cheap-to-restore position. Build with `make_train_dataset`."""

    def __init__(self, items: list[Record], captions: Captions, layout: Layout, *, seed: int,
                 image: ImageSettings = ImageSettings(), fields: Sequence[Field] = (),
                 counter: DropCounter | None = None, threads: int | None = None, stream: ShardStream | None = None):
        if layout.steps_per_epoch == 0:
            raise ValueError(f"{layout.num_records} records do not fill one global batch of {layout.global_batch_size}")
        check_fields(fields, len(items), len(captions.input_ids))
        self.items, self.captions, self.layout = items, captions, layout
        self.settings = dict(seed=seed, image=image, fields=tuple(fields), threads=threads)
        self.stream = stream  # sharded records: images streamed in the stream's order (medclip.data.shards)
        self.counter = counter if counter is not None else DropCounter()
        self.position = 0
        self._batches = None
        self._orders: dict[int, np.ndarray] = {}
        self._gaps = _GapAccounting(items, self.counter)
        _LIVE.add(self)
        _release_first_at_exit()

    def close(self) -> None:
        """Stops the background reading now (the next batch starts it again from the position)."""
        self._batches = None

    @property
    def steps_per_epoch(self) -> int:
        return self.layout.steps_per_epoch

    @property
    def batch_size(self) -> int:
        return self.layout.batch_size

    def dataset(self, position: int | None = None) -> tf.data.Dataset:
        """The tf.data.Dataset from `position` (default: the current one); its batches also hold "position"."""
        return build_train_dataset(self.items, self.captions, self.layout,
                                   position=self.position if position is None else position, stream=self.stream,
                                   **self.settings)

    def __next__(self) -> dict[str, np.ndarray]:
        if self._batches is None:
            self._batches = self.dataset().as_numpy_iterator()
        try:
            batch = next(self._batches)
        except StopIteration:
            if self.stream is not None:  # a shard that cannot be read ends the stream: a typed error naming it
                self.stream.raise_read_failure()
            raise
        positions = batch.pop("position")
        self._gaps.check(self.position, positions, self._record_at)
        self.position = int(positions[-1]) + 1
        return batch

    def state(self) -> dict:
        """JSON-serialisable; pass to `restore` (on an iterator built from the same records and settings)."""
        return {"position": self.position, "fingerprint": self._fingerprint()}

    def restore(self, state: dict) -> None:
        if state.get("fingerprint") != self._fingerprint():
            raise ValueError(f"iterator state {state.get('fingerprint')} was saved for other data or settings than "
                             f"{self._fingerprint()}; build the iterator with the same records, seed and batch size")
        self.position = int(state["position"])
        self._batches = None

    def _fingerprint(self) -> str:
        layout = self.layout
        return (f"records={layout.num_records} seed={self.settings['seed']} global_batch={layout.global_batch_size} "
                f"process={layout.process_index}/{layout.process_count}{self.order_tag}")

    @property
    def order_tag(self) -> str:
        """How the order is drawn, where it is not `epoch_order` (for the checkpoint's data fingerprint)."""
        return "" if self.stream is None else f" order=shards/{self.stream.cycle}/{self.stream.window}"

    def order(self, epoch: int) -> np.ndarray:
        """Record indices this process reads in `epoch`, in order: (per_epoch,) int64."""
        layout, seed = self.layout, self.settings["seed"]
        if self.stream is not None:
            return self.stream.order(seed, epoch, layout.process_index, layout.process_count, layout.per_epoch)
        return epoch_order(seed, epoch, layout)

    def _record_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.layout.per_epoch)
        if epoch not in self._orders:  # only needed when an image was skipped
            self._orders = {epoch: self.order(epoch)}
        return int(self._orders[epoch][offset])


def make_train_dataset(items: list[Record], captions: Captions, *, global_batch_size: int, seed: int,
                       image: ImageSettings = ImageSettings(), fields: Sequence[Field] = (),
                       counter: DropCounter | None = None, threads: int | None = None,
                       process_index: int | None = None, process_count: int | None = None,
                       stream: ShardStream | None = None) -> TrainIterator:
    """Endless shuffled training batches for this process (random resized crop, optional flip, CLIP normalisation).

    `captions`: `tokenize_captions(items, ...)`. `image`: the pixels' size, normalisation (the model's
    `config.image_preprocess`) and augmentation. `fields`: per-example extras (medclip.data.fields), each adding
    its batch keys. `counter` receives images that fail to decode in the graph. `threads` gives the pipeline its own
    thread pool of that size (default: TF's shared pool, one per core). `process_index`/`process_count` default
    to JAX's. `stream`: the images come from sharded records (`medclip.data.shards.ShardStream` over the split
    whose metadata `items` are), streamed.
    """
    layout = make_layout(len(items), global_batch_size, process_index, process_count)
    return TrainIterator(items, captions, layout, seed=seed, image=image, fields=fields, counter=counter,
                         threads=threads, stream=stream)


class EvalDataset:
    """Every record exactly once (resize + center crop, first caption), in padded batches with a "mask"."""

    def __init__(self, items: list[Record], captions: Captions, layout: Layout, *,
                 image: ImageSettings = ImageSettings(), fields: Sequence[Field] = (),
                 counter: DropCounter | None = None, threads: int | None = None):
        if any(field.replaces_pixels or field.valid is not None for field in fields):
            raise ValueError("evaluation decodes every image: a field cannot replace the pixels")
        check_fields(fields, len(items), len(captions.input_ids))
        self.items, self.captions, self.layout, self.image = items, captions, layout, image
        self.fields = tuple(fields)
        self.threads = threads
        self.counter = counter if counter is not None else DropCounter()
        self.num_batches = math.ceil(len(items) / layout.global_batch_size)
        padded = np.arange(self.num_batches * layout.global_batch_size)
        self.order = layout.process_slice(padded)  # global example index per position; >= len(items) is padding
        self._gaps = _GapAccounting(items, self.counter)

    def __len__(self) -> int:
        return self.num_batches

    def _record_at(self, position: int) -> int | None:
        index = int(self.order[position])
        return index if index < len(self.items) else None  # None: padding

    @property
    def num_examples(self) -> int:
        return len(self.items)

    def dataset(self) -> tf.data.Dataset:
        """The tf.data.Dataset; its batches also hold "position" (-1 for filler after skipped images)."""
        size, batch = self.image.size, self.layout.batch_size
        real = self.order < len(self.items)
        indices = np.where(real, self.order, 0)
        fetched = _in_bucket(self.items)
        read_image = None if fetched else _image_reader(self.items)
        first = tf.constant(self.captions.first)
        input_ids, attention_mask = tf.constant(self.captions.input_ids), tf.constant(self.captions.attention_mask)
        extras = _gather_fields(self.fields)

        def load(position, index, mask, contents=None):
            row = first[index]
            return {
                "pixel_values": images.eval_image(read_image(index) if contents is None else contents, size,
                                                  self.image.preprocess),
                "input_ids": input_ids[row],
                "attention_mask": attention_mask[row],
                "mask": mask,
                "position": position,
                **extras(index, row),
            }

        filler = {
            "pixel_values": tf.zeros([size, size, 3], tf.float32),
            "input_ids": tf.zeros([self.captions.input_ids.shape[1]], tf.int32),
            "attention_mask": tf.zeros([self.captions.input_ids.shape[1]], tf.int32),
            "mask": tf.constant(False),
            "position": tf.constant(-1, tf.int64),
            **{key: tf.zeros(array.shape[1:], array.dtype) for field in self.fields
               for key, array in (*field.per_record.items(), *field.per_caption.items())},
        }
        elements = tf.data.Dataset.from_tensor_slices((np.arange(len(self.order), dtype=np.int64), indices, real))
        if fetched:
            elements = _with_fetched_images(elements, self.items, index_at=1)
        dataset = elements.map(load, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
        # Skipped images would leave this process short: top up with filler so every process has num_batches.
        dataset = dataset.concatenate(tf.data.Dataset.from_tensors(filler).repeat())
        dataset = dataset.take(self.num_batches * batch).batch(batch, drop_remainder=True)
        return dataset.prefetch(tf.data.AUTOTUNE).with_options(_options(self.threads))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        expected = 0
        for batch in self.dataset().as_numpy_iterator():
            positions = batch.pop("position")
            positions = positions[positions >= 0]
            self._gaps.check(expected, positions, self._record_at)
            expected = int(positions[-1]) + 1 if positions.size else expected
            yield batch
        if expected < len(self.order):  # skipped images at the very end
            for position in range(expected, len(self.order)):
                if self.order[position] < len(self.items):
                    self._gaps.report(position, self._record_at)


def make_eval_dataset(items: list[Record], captions: Captions, *, global_batch_size: int,
                      image: ImageSettings = ImageSettings(), fields: Sequence[Field] = (),
                      counter: DropCounter | None = None, threads: int | None = None,
                      process_index: int | None = None, process_count: int | None = None) -> EvalDataset:
    """Eval batches for this process: resize + center crop, CLIP normalisation, first caption, "mask" for padding.
    Arguments as `make_train_dataset` (evaluation sees the records' second texts, as training does; the embedder,
    zero-shot and the app, with captions alone, feed the caption as both inputs)."""
    layout = make_layout(len(items), global_batch_size, process_index, process_count)
    return EvalDataset(items, captions, layout, image=image, fields=fields, counter=counter, threads=threads)
