"""Where a run reads and writes: the bucket URLs among its flags checked before anything is built, and the output
folder prepared (local or in a bucket, through medclip.storage)."""

from __future__ import annotations

import jax

from medclip import storage
from medclip.storage import AnyPath
from medclip.training.arguments import DataArguments, ModelArguments, TrainingArguments
from medclip.training.config_check import ConfigError
from medclip.training.distributed import barrier


def check_locations(model_args: ModelArguments, data_args: DataArguments, train_args: TrainingArguments) -> None:
    """A missing bucket or object, or missing credentials, in one line naming the URL (StorageError), before the
    model is built or the output folder is touched. Local paths are checked where they are read, as before."""
    storage.check_readable(data_args.train_file, "--train_file", folder=False)
    storage.check_readable(data_args.validation_file, "--validation_file", folder=False)
    storage.check_readable(data_args.data_dir, "--data_dir", folder=True)
    for flag in ("model_name_or_path", "vision_model_name_or_path", "text_model_name_or_path"):
        storage.check_readable(getattr(model_args, flag, None), f"--{flag}")
    storage.check_writable(train_args.output_dir, "--output_dir")


def prepare_output_dir(args: TrainingArguments) -> AnyPath:
    out = storage.as_path(args.output_dir)
    checkpoints = out / "checkpoints"
    has_checkpoint = checkpoints.is_dir() and any(checkpoints.iterdir())
    if out.is_dir() and any(out.iterdir()) and not args.overwrite_output_dir and not (args.resume and has_checkpoint):
        raise ConfigError(f"--output_dir {out} exists and is not empty; use --overwrite_output_dir, "
                          "or keep --resume to continue its checkpoint")
    barrier("output_dir checked")  # every process looked before anyone deletes
    if jax.process_index() == 0:
        if args.overwrite_output_dir and out.is_dir():
            storage.remove_tree(out)
        out.mkdir(parents=True, exist_ok=True)
    barrier("output_dir ready")
    return out
