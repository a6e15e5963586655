"""What a run leaves behind for users: the final model with its card and training curves in output_dir, each new
best model in output_dir/best, and optionally a Hub push. output_dir may be local or a bucket URL
(medclip.storage); `FlaxHybridCLIP.save_pretrained` writes to either."""

from __future__ import annotations

import contextlib
from typing import Any

from medclip import storage
from medclip.hybrid_clip import FlaxHybridCLIP
from medclip.storage import AnyPath
from medclip.training.arguments import DataArguments, ModelArguments, TrainingArguments


def model_card(model: FlaxHybridCLIP, model_args: ModelArguments, data_args: DataArguments,
               train_args: TrainingArguments, *, total_steps: int, global_batch: int,
               eval_metrics: dict[str, float] | None, compute_dtype: str) -> str:
    from medclip.checkpoints.model_card import render_model_card

    m, d, a = model_args, data_args, train_args
    source = d.data_dir or d.train_file or d.dataset_name or (
        f"{d.synthetic_train_samples} synthetic radiology-like pairs (medclip demo)" if d.synthetic_train_samples else "")
    training = {"steps": total_steps, "global batch": global_batch,
                "learning rate": a.learning_rate,
                "schedule": f"{a.lr_schedule}, warmup {a.warmup_steps}"
                            + (f", ReduceLROnPlateau on {a.plateau_metric}" if a.reduce_lr_on_plateau else ""),
                "weight decay": f"{a.weight_decay} ({a.weight_decay_type})", "loss": a.loss, "max_seq_length": d.max_seq_length,
                "compute dtype": compute_dtype}
    bases = tuple(x for x in (m.vision_model_name_or_path, m.text_model_name_or_path, m.model_name_or_path) if x)
    metrics = {k[5:]: v for k, v in (eval_metrics or {}).items() if k.startswith("eval_") and isinstance(v, float)}
    return render_model_card(model.config, training=training, eval_metrics=metrics, dataset=source,
                             base_models=bases)


def save_best(model: FlaxHybridCLIP, output_dir: AnyPath, tokenizer: Any) -> None:
    model.save_pretrained(output_dir / "best", tokenizer=tokenizer)


def export_final(final: FlaxHybridCLIP, output_dir: AnyPath, tokenizer: Any, card: str,
                 train_args: TrainingArguments) -> dict[str, Any]:
    """Final model, card and curves in output_dir (the card also in best/ when there is one); optional push."""
    from medclip.evaluation.plots import plot_training_curves

    final.save_pretrained(output_dir, tokenizer=tokenizer)
    storage.write_text(output_dir / "README.md", card)
    best = output_dir / "best"
    if best.is_dir():
        storage.write_text(best / "README.md", card)
    plot_training_curves(output_dir / "metrics.jsonl", output_dir / "training_curves.png")
    exported = {"model_dir": str(output_dir), "training_curves": str(output_dir / "training_curves.png")}
    if train_args.push_to_hub:
        from medclip.checkpoints.hub import push_model_to_hub

        repo_id = train_args.hub_model_id or output_dir.name
        model = FlaxHybridCLIP.from_pretrained(best) if best.is_dir() else final
        with contextlib.ExitStack() as stack:  # the Hub uploads local files: objects in a bucket are fetched first
            extra = {name: stack.enter_context(storage.local_copy(output_dir / name))
                     for name in ("metrics.jsonl", "training_curves.png")}
            exported["hub_commit"] = push_model_to_hub(
                model, repo_id, tokenizer=tokenizer, private=train_args.hub_private_repo, model_card=card,
                extra_files=extra)
    return exported
