#!/usr/bin/env python
"""Fine-tune a FlaxHybridCLIP (CLIP vision tower + any text encoder) on image-caption pairs.

Flags follow the original flax-community script (`--output_dir --text_model_name_or_path ...`); a single
JSON file argument is read as the flag values. All logic lives in `medclip.training`.
"""

from __future__ import annotations

import json
import logging
import sys

from transformers import HfArgumentParser

from medclip.training.arguments import DataArguments, ModelArguments, TrainingArguments


def parse(argv: list[str]) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])
    return parser.parse_args_into_dataclasses(argv)


def main(argv: list[str] | None = None) -> int:
    model_args, data_args, train_args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for noisy in ("absl", "jax._src", "orbax", "tensorflow", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from medclip.training.distributed import maybe_initialize
    from medclip.training.host_memory import keep_host_memory_mapped

    keep_host_memory_mapped()  # before JAX starts its CPU client

    maybe_initialize(train_args.coordinator_address, train_args.num_processes, train_args.process_id)
    if not (train_args.do_train or train_args.do_eval):
        raise SystemExit("nothing to do: pass --do_train and/or --do_eval")
    from medclip.training.trainer import Trainer

    trainer = Trainer(model_args, data_args, train_args)
    summary = trainer.train() if train_args.do_train else trainer.evaluate_only()
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
