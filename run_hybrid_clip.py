#!/usr/bin/env python
"""Fine-tune a FlaxHybridCLIP (CLIP vision tower + any text encoder) on image-caption pairs.

Flags follow the original flax-community script (`--output_dir --text_model_name_or_path ...`); a single
JSON file argument is read as the flag values. `--recipe NAME` starts from a named recipe in configs/ (later
flags win); `--recipe list` lists them. All logic lives in `medclip.training`.

Exit codes: 0 done, 2 a configuration error (the message names the flag, or the bucket URL that cannot be
reached), 3 a data error.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter(), time.process_time()  # the phase table's origin (medclip.training.phase_times)

import os  # noqa: E402

# transformers advises at import that PyTorch is missing ("Models won't be available"): this is a JAX tool and
# needs none of them. Only advisories are silenced (real warnings still print); set it to "" to see them.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import gc  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402

from medclip.quiet_imports import quiet_tensorflow_start_up  # noqa: E402
from medclip.training import recipes  # noqa: E402
from medclip.training.arguments import (DataArguments, FlagError, FlagParser, ModelArguments,  # noqa: E402
                                       TrainingArguments)
from medclip.storage import StorageError  # noqa: E402
from medclip.data.records import DataError as RecordsError  # noqa: E402  (e.g. a corrupt shard met mid-run)
from medclip.training.config_check import ConfigError, DataError, validate  # noqa: E402

EXIT_CONFIG, EXIT_DATA, EXIT_MODEL = 2, 3, 4


def _model_errors() -> tuple[type[Exception], ...]:
    """What loading a model or tokenizer raises for a bad folder, file, config or weights."""
    from medclip.checkpoints.conversion import WeightMismatchError
    from medclip.checkpoints.openclip import OpenCLIPConfigError
    from medclip.checkpoints.readers import CheckpointError
    from medclip.checkpoints.tokenizers import TokenizerError
    from medclip.models.registry import UnknownTowerError

    return (CheckpointError, WeightMismatchError, OpenCLIPConfigError, TokenizerError, UnknownTowerError,
            FileNotFoundError, NotADirectoryError)


def parse(argv: list[str]) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    parser = FlagParser(description=__doc__.split("\n\n")[1], epilog="Recipes: --recipe list")
    if len(argv) == 1 and argv[0].endswith(".json"):
        with open(argv[0]) as f:
            flags = json.load(f)
        for name in recipes.DEPRECATED_FLAGS.keys() & flags.keys():
            logging.getLogger(__name__).warning("%s is deprecated and ignored: %s", name,
                                                recipes.DEPRECATED_FLAGS[name])
            del flags[name]
        return parser.parse_json_flags(flags)
    argv, recipe = recipes.expand(argv)
    if recipe is not None:
        logging.getLogger(__name__).info("recipe %s (%s): %s", recipe.name, recipe.path, " ".join(recipe.argv()))
    return parser.parse_flags(argv)


def main(argv: list[str] | None = None, started: tuple[float, float] | None = None) -> int:
    """`started`: (perf_counter, process_time) at the process's start, charged to the phase table's start-up;
    default: now."""
    started = started if started is not None else (time.perf_counter(), time.process_time())
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    quiet_tensorflow_start_up()
    for noisy in ("absl", "jax._src", "orbax", "tensorflow", "transformers", "fsspec", "gcsfs"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if argv[:2] == ["--recipe", "list"] or argv[:1] == ["--recipe=list"]:
        print(recipes.listing())
        return 0
    try:
        model_args, data_args, train_args = parse(argv)
        validate(model_args, data_args, train_args)  # once, before anything is built
        from medclip.checkpoints.hub import check_model_names

        check_model_names(model_args.model_name_or_path, model_args.text_model_name_or_path,
                          model_args.vision_model_name_or_path, model_args.tokenizer_name)
        return run(model_args, data_args, train_args, started)
    except (ConfigError, FlagError) as error:
        print(f"run_hybrid_clip.py: configuration error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except (DataError, RecordsError) as error:
        print(f"run_hybrid_clip.py: data error: {error}", file=sys.stderr)
        return EXIT_DATA
    except StorageError as error:  # a bucket, object or credentials that are not there: a bad flag value
        print(f"run_hybrid_clip.py: storage error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except _model_errors() as error:
        print(f"run_hybrid_clip.py: cannot load the model: {error}", file=sys.stderr)
        return EXIT_MODEL


def run(model_args: ModelArguments, data_args: DataArguments, train_args: TrainingArguments,
        started: tuple[float, float] | None = None) -> int:
    from medclip.training.distributed import maybe_initialize
    from medclip.training.host_memory import keep_host_memory_mapped

    keep_host_memory_mapped()  # before JAX starts its CPU client
    from medclip.training import compilation_cache

    cache = compilation_cache.enable(train_args.compilation_cache_dir)
    logging.getLogger(__name__).info("XLA compilation cache: %s", cache or "off")

    maybe_initialize(train_args.coordinator_address, train_args.num_processes, train_args.process_id)
    from medclip.training.phase_times import PhaseTimer
    from medclip.training.trainer import Trainer

    phases = PhaseTimer(started)
    phases.since_last("start-up")  # imports, flags, checks, the compilation cache, the trainer's modules
    trainer = Trainer(model_args, data_args, train_args, phases)
    summary = trainer.train() if train_args.do_train else trainer.evaluate_only()
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    code = main(started=STARTED)
    # All output is written and closed. The interpreter's final garbage collection would walk the whole object
    # graph of the run (JAX traces and caches, TensorFlow, transformers): up to tens of seconds of exit time.
    gc.freeze()
    sys.exit(code)
