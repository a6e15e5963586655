"""Which model and tokenizer a run starts from: the tiny `demo` preset, a saved model in any layout
FlaxHybridCLIP.from_pretrained reads (ours, a whole CLIPModel, OpenCLIP), or two towers (the ROCO recipe:
CLIP ViT-B/32 + SciBERT), each pretrained or, with --vision_config / --text_config, from a config and --seed."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from medclip import storage
from medclip.checkpoints import pretrained
from medclip.checkpoints.hub import resolve_model_dir
from medclip.checkpoints.tokenizers import for_model_text, load_tokenizer, tokenizer_for_model
from medclip.hybrid_clip import FlaxHybridCLIP
from medclip.models import BertConfig, CLIPVisionConfig, HybridCLIPConfig
from medclip.models.fusion import FusionConfig, MLMFusion
from medclip.models.heads import HeadConfig
from medclip.models.registry import max_text_positions
from medclip.training.arguments import DataArguments, ModelArguments
from medclip.training.distributed import barrier
from medclip.training.dtypes import compute_dtype
from medclip.training.errors import ConfigError
from medclip.training.tower_configs import tower_config_flag

logger = logging.getLogger(__name__)
__all__ = ["ModelSetupError", "build_model_and_tokenizer", "compute_dtype", "demo_config", "load_tokenizer"]


class ModelSetupError(ConfigError):
    """The flags do not describe a model and tokenizer that can be used together."""


DEMO_CONTEXT_LENGTH = 72


def demo_config(vocab_size: int, image_size: int, max_seq_length: int, **changes: Any) -> HybridCLIPConfig:
    """Small enough to train in minutes on 2 CPU cores, big enough to learn the synthetic captions."""
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                              image_size=image_size, patch_size=8)
    text = BertConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=max(max_seq_length, 16),
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return HybridCLIPConfig(vision_config=vision, text_config=text, projection_dim=64, **changes)


def _saved_model(model_args: ModelArguments, dtype) -> tuple[FlaxHybridCLIP, Any]:
    with storage.local_copy(model_args.model_name_or_path) as local:  # a bucket folder: fetched once, for both
        model = FlaxHybridCLIP.from_pretrained(local, dtype=dtype, remat=model_args.remat,
                                               open_clip_model=model_args.open_clip_model)
        if model_args.tokenizer_name:
            return model, load_tokenizer(model_args.tokenizer_name)
        source = str(local).removeprefix("hf-hub:")
        if Path(source).is_file():  # a bare state dict: its folder may hold the tokenizer
            source = str(Path(source).parent)
        return model, tokenizer_for_model(source, model.config)


def _tower_config(model_args: ModelArguments, kind: str) -> tuple[Any, Any, str | None]:
    """(the tower's config, its folder's preprocessing or None, the pretrained folder to load it from or None
    for a fresh tower)."""
    configured, source = tower_config_flag(model_args, kind), getattr(model_args, f"{kind}_model_name_or_path")
    overrides = {"image_size": model_args.image_size} if kind == "vision" and model_args.image_size else {}
    if configured is not None:
        return configured.replace(**overrides), None, None
    if not source:
        raise ModelSetupError(f"--{'text' if kind == 'vision' else 'vision'}_config needs a {kind} tower too: "
                              f"--{kind}_model_name_or_path or --{kind}_config")
    folder = resolve_model_dir(source)
    return *pretrained.pretrained_tower_config(folder, kind, overrides, name=source), source


def _configured_towers(model_args: ModelArguments, dtype, seed: int, heads: dict[str, Any],
                       new: dict[str, Any]) -> tuple[FlaxHybridCLIP, Any]:
    """At least one tower from a config: the model is initialised from `seed` (towers, heads and any fusion
    module), then any pretrained tower is loaded over its part."""
    if model_args.model_preset is not None:
        raise ModelSetupError("--model_preset and --vision_config/--text_config both describe the model: give one")
    vision_config, preprocess, vision_source = _tower_config(model_args, "vision")
    text_config, _, text_source = _tower_config(model_args, "text")
    if text_source is None and not model_args.tokenizer_name:
        raise ModelSetupError("--text_config builds a text tower from scratch: give --tokenizer_name (its "
                              "vocab_size must cover the tokenizer)")
    config = HybridCLIPConfig(vision_config=vision_config, text_config=text_config,
                              projection_dim=model_args.projection_dim,
                              logit_bias_init_value=model_args.logit_bias_init,
                              vision_head=heads["vision_head"](HeadConfig(type=model_args.vision_head)),
                              text_head=heads["text_head"](HeadConfig(pooler=model_args.text_pooler)),
                              preprocess=preprocess, **new)
    model = FlaxHybridCLIP(config, dtype=dtype, remat=model_args.remat, rngs=nnx.Rngs(seed))
    for kind, source in (("vision", vision_source), ("text", text_source)):
        if source is not None:
            pretrained.load_tower(model, kind, source, seed=seed)
    logger.info("towers: vision %s, text %s", vision_source or "from --vision_config",
                text_source or "from --text_config")
    return model, load_tokenizer(model_args.tokenizer_name or text_source)


def build_model_and_tokenizer(model_args: ModelArguments, data_args: DataArguments, dtype, seed: int,
                              output_dir: Path, mlm: bool = False) -> tuple[FlaxHybridCLIP, Any]:
    """`mlm` adds PMC-CLIP's fusion module and MLM head (fresh) where the model has none."""
    heads = _head_changes(model_args)
    new = {"text_inputs": 2 if data_args.second_text_field else 1, "fusion": FusionConfig() if mlm else None}
    if model_args.model_preset is not None:
        if model_args.model_preset != "demo":
            raise ModelSetupError(f"unknown --model_preset {model_args.model_preset!r}; available: demo")
        from medclip.data.synthetic import write_synthetic_tokenizer

        if model_args.tokenizer_name:
            tokenizer = load_tokenizer(model_args.tokenizer_name)
        else:
            if jax.process_index() == 0:  # one writer; the other processes read it after the barrier
                with storage.staged_folder(output_dir / "demo_tokenizer") as folder:
                    write_synthetic_tokenizer(folder)
            barrier("demo tokenizer")
            with storage.local_copy(output_dir / "demo_tokenizer") as folder:
                tokenizer = load_tokenizer(folder)
        image_size = model_args.image_size or data_args.synthetic_image_size
        config = demo_config(len(tokenizer), image_size, data_args.max_seq_length or DEMO_CONTEXT_LENGTH, **new)
        config = config.replace(**{name: head(getattr(config, name)) for name, head in heads.items()})
        model = FlaxHybridCLIP(config, dtype=dtype, remat=model_args.remat, rngs=nnx.Rngs(seed))
    elif model_args.model_name_or_path is not None:
        model, tokenizer = _saved_model(model_args, dtype)
        _adapt_loaded(model, model_args, data_args, mlm, heads, seed)
    elif model_args.vision_config or model_args.text_config:
        model, tokenizer = _configured_towers(model_args, dtype, seed, heads, new)
    else:
        if not (model_args.text_model_name_or_path and model_args.vision_model_name_or_path):
            raise ModelSetupError("give --model_name_or_path, or both --text_model_name_or_path and "
                                  "--vision_model_name_or_path, or --model_preset demo")
        overrides = {"image_size": model_args.image_size} if model_args.image_size else None
        model = FlaxHybridCLIP.from_text_vision_pretrained(
            model_args.text_model_name_or_path, model_args.vision_model_name_or_path,
            projection_dim=model_args.projection_dim, logit_bias_init_value=model_args.logit_bias_init,
            vision_config_overrides=overrides, dtype=dtype, remat=model_args.remat, seed=seed,
            vision_head=heads["vision_head"](HeadConfig(type=model_args.vision_head)),
            text_head=heads["text_head"](HeadConfig(pooler=model_args.text_pooler)), **new)
        tokenizer = load_tokenizer(model_args.tokenizer_name or model_args.text_model_name_or_path)
    _set_text_preprocess(model, model_args, data_args, tokenizer)
    tokenizer = for_model_text(tokenizer, model.config.text_preprocess)  # e.g. open_clip models: ftfy first
    if mlm and getattr(tokenizer, "mask_token_id", None) is None:
        raise ModelSetupError("--mlm needs a tokenizer with a mask token ([MASK]); this text tower's tokenizer "
                              f"({type(tokenizer).__name__}) has none: use a BERT-family text tower, or drop --mlm")
    return model, tokenizer


def _set_text_preprocess(model: FlaxHybridCLIP, model_args: ModelArguments, data_args: DataArguments,
                         tokenizer: Any) -> None:
    """The model's own context length and padding rule, unless --max_seq_length / --text_mask_padding override
    them; what training then uses is saved with the model, so every tool tokenises as it was trained.
    `data_args.max_seq_length` is set to the length used (the data pipeline pads captions to it)."""
    config = model.config
    check_text_inputs(config.text_config, tokenizer, data_args.max_seq_length or config.context_length)
    text = config.text_preprocess
    try:
        if data_args.max_seq_length is not None:
            text = text.replace(context_length=data_args.max_seq_length)
        if model_args.text_mask_padding is not None:
            text = text.replace(mask_padding=model_args.text_mask_padding,
                                padding="max_length" if not model_args.text_mask_padding else text.padding)
    except ValueError as error:
        raise ModelSetupError(f"--max_seq_length / --text_mask_padding: {error}") from None
    model.config = config.replace(text_preprocess=text)
    data_args.max_seq_length = model.config.context_length
    if not text.mask_padding:
        logger.info("text: %d tokens, padding attended to (mask_padding false): no text packing",
                    data_args.max_seq_length)


def _head_changes(model_args: ModelArguments) -> dict[str, Any]:
    """--projection_dropout as changes to both heads' configs (identity when not given)."""
    p = model_args.projection_dropout
    change = (lambda head: head) if p is None else (lambda head: dataclasses.replace(head, dropout=p))
    return {"vision_head": change, "text_head": change}


def _adapt_loaded(model: FlaxHybridCLIP, model_args: ModelArguments, data_args: DataArguments, mlm: bool,
                  heads: dict[str, Any], seed: int) -> None:
    """A saved model takes the flags that do not change its trained weights' shapes: projection dropout, and a
    fresh fusion module for --mlm. A second text input would change the text head's width: refused by
    `config_check.check_model`."""
    config = model.config
    if not data_args.second_text_field and config.text_inputs == 2:
        logger.warning("%s takes two text inputs and no --second_text_field was given: the caption fills both",
                       model_args.model_name_or_path)
    config = config.replace(**{name: head(getattr(config, name)) for name, head in heads.items()})
    if mlm and config.fusion is None:
        config = config.replace(fusion=FusionConfig())
        logger.warning("%s has no fusion module: --mlm adds a fresh one (PMC-CLIP's, %d layers)",
                       model_args.model_name_or_path, config.fusion.num_layers)
        model.fusion = nnx.data(MLMFusion(config.fusion, config.text_config.hidden_size, config.projection_dim,
                                          config.text_config.vocab_size, dtype=model.dtype, rngs=nnx.Rngs(seed + 2)))
    model.config = config


def check_text_inputs(text_config: Any, tokenizer: Any, max_seq_length: int) -> None:
    if len(tokenizer) > text_config.vocab_size:
        raise ModelSetupError(f"the tokenizer has {len(tokenizer)} tokens but the text model's vocabulary is "
                              f"{text_config.vocab_size}: they do not belong together (--tokenizer_name?)")
    if max_seq_length > max_text_positions(text_config):
        raise ModelSetupError(f"--max_seq_length {max_seq_length} exceeds the text model's "
                              f"{max_text_positions(text_config)} positions")
