"""From the data flags to the train iterator and eval dataset the trainer consumes.

Every dropped record is counted by reason; the counts are logged, written to `data_report.json` and
returned in the run summary, so no loss of data is silent.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from medclip import storage
from medclip.data import shard_manifest, shards
from medclip.data.concepts import ConceptVocabulary, caption_group_ids, concept_field
from medclip.data.fields import Field, second_text
from medclip.data.pipeline import (Captions, EvalDataset, ImageSettings, TrainIterator, epoch_order,
                                   make_eval_dataset, make_train_dataset, tokenize_captions)
from medclip.data.records import DropCounter, Record
from medclip.data.sources.auto import load_records
from medclip.data.sources.concept_names import ConceptNamesError, concept_names_for, name_records
from medclip.data.splits import SplitError, parse_ratios, split_records
from medclip.training.distributed import barrier
from medclip.training.arguments import DataArguments, TrainingArguments, csv_delimiter
from medclip.training.config_check import ConfigError, DataError
from medclip.training.losses import batch_fields
from medclip.training.phase_times import PhaseTimer

logger = logging.getLogger(__name__)


class PreparedSources(dict):
    """source -> whether it is a prepared folder of sharded records (`shard_manifest.is_prepared`), asked once per
    source: on a bucket each question is a request, and one run's start-up asks it of the training source in
    several places. One per build of a run's data, so a folder prepared later is seen by the next build."""

    def __missing__(self, source: Any) -> bool:
        self[source] = answer = shard_manifest.is_prepared(source)
        return answer


def load_split(args: DataArguments, split: str, output_dir: Path, seed: int,
               prepared: PreparedSources | None = None) -> tuple[list[Record], DropCounter]:
    """Records of `split` ("train" or "validation") from whichever source the flags name."""
    prepared = PreparedSources() if prepared is None else prepared
    counter = DropCounter(strict=args.strict)
    file = args.train_file if split == "train" else args.validation_file
    if args.synthetic_train_samples:
        from medclip.data.synthetic import write_synthetic_dataset

        n = args.synthetic_train_samples if split == "train" else args.synthetic_validation_samples
        folder = output_dir / "synthetic" / split
        source = folder / f"{split}.jsonl"
        if jax.process_index() == 0:  # one writer; the other processes read it after the barrier
            with storage.staged_folder(folder) as local:  # a bucket output_dir: written locally, uploaded
                write_synthetic_dataset(local, n, seed=seed + (0 if split == "train" else 1),
                                        image_size=args.synthetic_image_size, name=split)
        barrier(f"synthetic {split}")
    else:
        source = file or args.data_dir or args.dataset_name
        if split != "train" and prepared[source] and split not in _manifest(source)["splits"]:
            return [], counter  # prepared without this split: no evaluation, as with no --validation_file
    part = None
    if args.split_ratios and not args.synthetic_train_samples:
        if args.validation_file:
            raise ConfigError("--split_ratios cuts one source into train, validation and test: drop "
                              "--validation_file")
        source, part = args.train_file or args.data_dir or args.dataset_name, split
    if source is None:
        return [], counter
    try:
        items = load_records(source, "train" if part else split, counter=counter,
                             min_caption_length=args.min_caption_length, image_column=args.image_column,
                             caption_column=args.caption_column, delimiter=csv_delimiter(args.csv_delimiter),
                             prepared=prepared[source], **args.load_options())
    except shard_manifest.ShardError as error:  # a prepared folder's missing or truncated shard
        raise DataError(str(error)) from None
    if part is not None:
        try:
            items = split_records(items, parse_ratios(args.split_ratios), seed)[part]
        except SplitError as error:
            raise ConfigError(str(error)) from None
        counter.kept = len(items)  # this part's; the other parts are the other splits, not drops
    if args.second_text_field == "concepts":
        name_records(items, concept_names(args))
    limit = args.max_train_samples if split == "train" else args.max_eval_samples
    return (items[:limit] if limit else items), counter


def _manifest(source) -> dict:
    try:
        return shard_manifest.read_manifest(source)
    except shard_manifest.ShardError as error:
        raise DataError(str(error)) from None


def streams_train(args: DataArguments, prepared: PreparedSources | None = None) -> bool:
    """Whether the training data is a prepared folder of sharded records, whose images stream."""
    source = args.train_file or args.data_dir or args.dataset_name
    prepared = PreparedSources() if prepared is None else prepared
    return not args.synthetic_train_samples and prepared[source]


def prepared_train(args: DataArguments, prepared: PreparedSources | None = None
                   ) -> tuple[list[Record], DropCounter, shards.ShardStream] | None:
    """A prepared folder of sharded records (`medclip prepare --format shards`) named as the training data: its
    examples' text in memory, its images as a stream. None for any other source."""
    source = args.train_file or args.data_dir or args.dataset_name
    if not streams_train(args, prepared):
        return None
    for flag, value in (("--split_ratios", args.split_ratios), ("--max_train_samples", args.max_train_samples)):
        if value:
            raise ConfigError(f"{flag} does not apply to sharded records ({source}), which stream in the order they "
                              "were prepared; prepare the part you want instead")
    try:
        split = shard_manifest.open_split(source, "train")
        items = shard_manifest.load_metadata(split)
    except shard_manifest.ShardError as error:
        raise DataError(str(error)) from None
    except OSError as error:
        raise DataError(f"{source}: {storage.first_line(error)}") from None
    counter = DropCounter(strict=args.strict)
    counter.kept = len(items)
    if args.second_text_field == "concepts":
        name_records(items, concept_names(args))
    return items, counter, shards.ShardStream(split)


def concept_names(args: DataArguments) -> dict[str, str]:
    """CUI -> name for the concepts given as the second text: --concept_names, else ROCOv2's cui_mapping.csv
    beside the data; {} (said once) when there are none, and the second text stays the codes."""
    source = args.train_file or args.validation_file or args.data_dir
    try:
        names = concept_names_for(source, args.concept_names)
    except ConceptNamesError as error:
        raise DataError(str(error)) from None
    if not names and not _said_no_names:
        _said_no_names.append(True)
        logger.warning("--second_text_field concepts: no concept names (ROCO v1 ships CUIs only; ROCOv2 has "
                       "cui_mapping.csv, or pass --concept_names CUI,name CSV): the second text is the CUI codes")
    return names


_said_no_names: list[bool] = []  # the warning above is given once per process


@dataclasses.dataclass
class DataFeed:
    train: TrainIterator | None
    eval: EvalDataset | None
    eval_captions: list[str]
    counters: dict[str, tuple[int, DropCounter]]  # split -> (records kept at load, drop counter)
    global_train_batch_size: int
    global_eval_batch_size: int
    # The per-example fields the loss reads (losses.batch_fields), for the eval set in its order; {} if none.
    eval_loss_fields: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    logged_summary: dict[str, Any] | None = None  # the report is logged again only when its counts changed

    @property
    def drop_summary(self) -> dict[str, Any]:
        """Recomputed on demand: images that fail to decode during training are counted as they occur."""
        return {split: {"kept": kept, **counter.summary()} for split, (kept, counter) in self.counters.items()}

    @property
    def has_train(self) -> bool:
        return self.train is not None

    @property
    def has_eval(self) -> bool:
        return self.eval is not None

    @property
    def steps_per_epoch(self) -> int:
        return self.train.steps_per_epoch if self.train is not None else 0

    def _data_fingerprint(self) -> str:
        layout, seed = self.train.layout, self.train.settings["seed"]
        return (f"records={layout.num_records} seed={seed} global_batch={layout.global_batch_size} "
                f"processes={layout.process_count}{self.train.order_tag}")

    def train_state(self) -> dict[str, Any]:
        """Every process's stream position, for the checkpoint (orbax writes JSON from process 0 only, so
        the positions are gathered first). Collective: all processes call it."""
        position = np.asarray([self.train.position], np.int64)
        if jax.process_count() > 1:
            position = multihost_utils.process_allgather(position, tiled=True)
        return {"positions": [int(p) for p in position], "fingerprint": self._data_fingerprint()}

    def restore_train(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") != self._data_fingerprint():
            raise DataError(f"the checkpoint's data ({state.get('fingerprint')}) is not this run's "
                             f"({self._data_fingerprint()}): resume with the same data, seed, batch size and "
                             "number of processes, or start a new --output_dir")
        self.train.restore({**self.train.state(), "position": state["positions"][jax.process_index()]})

    def train_ids(self, start: int, end: int) -> list[str]:
        """Record ids at train-stream positions [start, end) of this process (for the data-order audit)."""
        layout = self.train.layout
        ids, orders = [], {}
        for position in range(start, end):
            epoch, offset = divmod(position, layout.per_epoch)
            if epoch not in orders:
                orders = {epoch: self.train.order(epoch)}
            ids.append(self.train.items[int(orders[epoch][offset])].id)
        return ids

    def eval_batches(self):
        return iter(self.eval)


# (training records, their tokenised captions) -> more per-example fields: what the trainer computes from the
# model before the feed is built (a locked tower's cached features, whole-word flags).
TrainFields = Callable[[list[Record], Captions], Sequence[Field]]


def image_settings(args: DataArguments, model_config) -> ImageSettings:
    """The pixels of both pipelines (and of a cached locked image tower): the model's size and normalisation."""
    return ImageSettings(size=model_config.vision_config.image_size, preprocess=model_config.image_preprocess,
                         crop_scale=(args.crop_scale_min, 1.0), hflip=args.hflip, train_crop=args.train_crop)


def build_data(args: DataArguments, train_args: TrainingArguments, tokenizer, model_config, output_dir: Path, *,
               num_devices: int, train_fields: TrainFields | None = None,
               prepared: PreparedSources | None = None, phases: PhaseTimer | None = None) -> DataFeed:
    """`train_fields` adds per-example fields computed from the training records and captions, before the
    training iterator is built. `prepared`: what the caller has learnt of which sources are prepared folders.
    `phases` is charged the tokenization (medclip.training.phase_times)."""
    prepared = PreparedSources() if prepared is None else prepared
    phases = phases if phases is not None else PhaseTimer()
    image = image_settings(args, model_config)
    global_train = train_args.per_device_train_batch_size * num_devices
    global_eval = train_args.per_device_eval_batch_size * num_devices
    counters: dict[str, tuple[int, DropCounter]] = {}
    train = evaluation = vocab = None
    eval_captions: list[str] = []
    eval_loss_fields: dict[str, np.ndarray] = {}
    concept_width = args.concept_width if batch_fields(train_args.loss) else 0
    if train_args.do_train:
        streamed = prepared_train(args, prepared)
        stream = None
        if streamed is not None:
            items, counter, stream = streamed
        else:
            items, counter = load_split(args, "train", output_dir, train_args.seed, prepared)
        counters["train"] = (len(items), counter)
        if not items:
            raise ConfigError("--do_train needs training data: --train_file, --data_dir, --dataset_name or "
                             "--synthetic_train_samples")
        with phases.phase("tokenization"):
            fields = _second_text(items, tokenizer, args)
        if len(items) < global_train:
            raise DataError(f"{len(items)} training pairs do not fill one global batch of {global_train} "
                             f"({train_args.per_device_train_batch_size} per device x {num_devices} devices)")
        with phases.phase("tokenization"):
            captions = tokenize_captions(items, tokenizer, args.max_seq_length)
        if concept_width:
            vocab = ConceptVocabulary.build(items, source=args.concept_source)
            fields.append(concept_field(items, vocab, concept_width, counter))
        fields += train_fields(items, captions) if train_fields is not None else []
        train = make_train_dataset(items, captions, global_batch_size=global_train, seed=train_args.seed,
                                   image=image, fields=fields, counter=counter,
                                   threads=args.preprocessing_num_workers, stream=stream)
    if train_args.do_eval or train_args.do_train:
        items, counter = load_split(args, "validation", output_dir, train_args.seed, prepared)
        if items:
            with phases.phase("tokenization"):
                fields = _second_text(items, tokenizer, args)
                captions = tokenize_captions(items, tokenizer, args.max_seq_length)
            counters["validation"] = (len(items), counter)
            evaluation = make_eval_dataset(items, captions,
                                           global_batch_size=global_eval, image=image, fields=fields,
                                           counter=counter, threads=args.preprocessing_num_workers)
            eval_captions = [record.captions[0] for record in items]
            if concept_width:  # the training vocabulary (the eval set's own for --do_eval alone)
                vocab = vocab or ConceptVocabulary.build(items, source=args.concept_source)
                eval_loss_fields = {"concept_ids": vocab.encode(items, concept_width)[0],
                                    "caption_group": caption_group_ids(eval_captions)}
    feed = DataFeed(train=train, eval=evaluation, eval_captions=eval_captions, counters=counters,
                    global_train_batch_size=global_train,
                    global_eval_batch_size=global_eval, eval_loss_fields=eval_loss_fields)
    write_data_report(feed, output_dir)
    return feed


def _second_text(items: list[Record], tokenizer, args: DataArguments) -> list[Field]:
    """[--second_text_field's tokenised texts], or [] without one; a field no record has is a data error."""
    if not args.second_text_field:
        return []
    try:
        return [second_text(items, tokenizer, args.max_seq_length, args.second_text_field)]
    except ValueError as error:
        raise DataError(str(error)) from None


def write_data_report(feed: DataFeed, output_dir: Path) -> None:
    summary = feed.drop_summary
    if summary != feed.logged_summary:
        logger.info("data: %s", json.dumps(summary))
        feed.logged_summary = summary
    if jax.process_index() == 0:
        storage.write_text(output_dir / "data_report.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
