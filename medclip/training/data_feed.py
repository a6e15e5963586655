"""From the data flags to the train iterator and eval dataset the trainer consumes.

Every dropped record is counted by reason; the counts are logged, written to `data_report.json` and
returned in the run summary, so no loss of data is silent.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import jax

from medclip.data.pipeline import EvalDataset, TrainIterator, make_eval_dataset, make_train_dataset
from medclip.data.records import DropCounter, Record
from medclip.data.sources.auto import load_records
from medclip.training.arguments import DataArguments, TrainingArguments

logger = logging.getLogger(__name__)


def load_split(args: DataArguments, split: str, output_dir: Path, seed: int) -> tuple[list[Record], DropCounter]:
    """Records of `split` ("train" or "validation") from whichever source the flags name."""
    counter = DropCounter(strict=args.strict)
    file = args.train_file if split == "train" else args.validation_file
    if args.synthetic_train_samples:
        from medclip.data.synthetic import write_synthetic_dataset

        n = args.synthetic_train_samples if split == "train" else args.synthetic_validation_samples
        source = write_synthetic_dataset(output_dir / "synthetic" / split, n,
                                         seed=seed + (0 if split == "train" else 1),
                                         image_size=args.synthetic_image_size, name=split)
    else:
        source = file or args.data_dir or args.dataset_name
    if source is None:
        return [], counter
    items = load_records(source, split, counter=counter, min_caption_length=args.min_caption_length,
                         image_column=args.image_column, caption_column=args.caption_column)
    limit = args.max_train_samples if split == "train" else args.max_eval_samples
    return (items[:limit] if limit else items), counter


@dataclasses.dataclass
class DataFeed:
    train: TrainIterator | None
    eval: EvalDataset | None
    eval_captions: list[str]
    counters: dict[str, tuple[int, DropCounter]]  # split -> (records kept at load, drop counter)
    global_train_batch_size: int
    per_process_eval_batch: int

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

    def eval_batches(self):
        return iter(self.eval)


def build_data(args: DataArguments, train_args: TrainingArguments, tokenizer, model_config, output_dir: Path, *,
               num_devices: int) -> DataFeed:
    image_size = model_config.vision_config.image_size
    global_train = train_args.per_device_train_batch_size * num_devices
    global_eval = train_args.per_device_eval_batch_size * num_devices
    counters: dict[str, tuple[int, DropCounter]] = {}
    train = evaluation = None
    eval_captions: list[str] = []
    if train_args.do_train:
        items, counter = load_split(args, "train", output_dir, train_args.seed)
        counters["train"] = (len(items), counter)
        if not items:
            raise SystemExit("--do_train needs training data: --train_file, --data_dir, --dataset_name or "
                             "--synthetic_train_samples")
        if len(items) < global_train:
            raise SystemExit(f"{len(items)} training pairs do not fill one global batch of {global_train} "
                             f"({train_args.per_device_train_batch_size} per device x {num_devices} devices)")
        train = make_train_dataset(items, tokenizer, image_size=image_size, max_seq_length=args.max_seq_length,
                                   global_batch_size=global_train, seed=train_args.seed,
                                   crop_scale=(args.crop_scale_min, 1.0), hflip=args.hflip, counter=counter)
    if train_args.do_eval or train_args.do_train:
        items, counter = load_split(args, "validation", output_dir, train_args.seed)
        if items:
            counters["validation"] = (len(items), counter)
            evaluation = make_eval_dataset(items, tokenizer, image_size=image_size,
                                           max_seq_length=args.max_seq_length, global_batch_size=global_eval,
                                           counter=counter)
            eval_captions = [record.captions[0] for record in items]
    feed = DataFeed(train=train, eval=evaluation, eval_captions=eval_captions, counters=counters,
                    global_train_batch_size=global_train,
                    per_process_eval_batch=global_eval // jax.process_count())
    write_data_report(feed, output_dir)
    return feed


def write_data_report(feed: DataFeed, output_dir: Path) -> None:
    summary = feed.drop_summary
    logger.info("data: %s", json.dumps(summary))
    if jax.process_index() == 0:
        (output_dir / "data_report.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
