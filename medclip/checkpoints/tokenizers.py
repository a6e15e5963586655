"""The tokenizer that belongs to a model: in its folder, or where its OpenCLIP config says its text tower came
from. Library code: a missing or unusable tokenizer raises `TokenizerError`, which scripts turn into exits."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from medclip.checkpoints.hub import TOKENIZER_FILES, resolve_model_dir
from medclip.checkpoints.openclip_config import text_tokenizer_name
from medclip.models.preprocess import clean_caption

logger = logging.getLogger(__name__)


# Slow tokenizers accepted because transformers has no fast form of them: SigLIP's SentencePiece tokenizer, whose
# text canonicalisation (punctuation stripped, whitespace collapsed) no converted fast tokenizer reproduces, so
# the token ids the model was trained on come only from it. It needs the sentencepiece package.
SLOW_TOKENIZERS = ("SiglipTokenizer",)


class TokenizerError(ValueError):
    """No usable (fast) tokenizer for a model; says where it looked and what to pass instead."""


def load_tokenizer(name_or_path: str | os.PathLike) -> Any:
    """A fast tokenizer from a folder or Hub id (medclip tokenises whole datasets at once with one)."""
    from transformers import AutoTokenizer

    folder = resolve_model_dir(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{name_or_path}: no tokenizer could be loaded ({e})") from None
    if not tokenizer.is_fast and type(tokenizer).__name__ not in SLOW_TOKENIZERS:
        raise TokenizerError(f"{name_or_path}: no fast tokenizer; medclip tokenises whole datasets at once with one")
    return tokenizer


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def tokenizer_for_model(model_dir: str | os.PathLike, config: Any = None) -> Any:
    """The model folder's own tokenizer; else, for an OpenCLIP model with a Hugging Face text tower, the one its
    config names (`hf_tokenizer_name`, a local folder or a cached Hub id)."""
    folder = resolve_model_dir(model_dir)
    if has_tokenizer(folder):
        return load_tokenizer(folder)
    name = text_tokenizer_name(config) if config is not None else None
    if name:
        logger.info("%s has no tokenizer files: using its text tower's, %s", folder, name)
        try:
            return load_tokenizer(name)
        except (OSError, ValueError) as e:
            raise TokenizerError(f"{folder} has no tokenizer files and its text tower's tokenizer {name!r} is not "
                                 f"available ({e}); pass a tokenizer folder (--tokenizer_name)") from None
    raise TokenizerError(f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); pass one with "
                         "--tokenizer_name (for OpenAI CLIP text towers, e.g. openai/clip-vit-base-patch32's)")


class CleaningTokenizer:
    """A tokenizer that first cleans captions as the model's own tokenizer did (`TextPreprocess.clean`: open_clip
    runs ftfy and unescapes HTML before tokenising), so every caller (training, evaluation, the tools) sends the
    model the token ids it was trained on. Everything else is the wrapped tokenizer's."""

    def __init__(self, tokenizer: Any, clean: str):
        self.tokenizer, self.clean = tokenizer, clean

    def __call__(self, text: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(text, str):
            text = clean_caption(text, self.clean)
        elif isinstance(text, (list, tuple)):
            text = [clean_caption(t, self.clean) if isinstance(t, str) else t for t in text]
        return self.tokenizer(text, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)

    def __len__(self) -> int:
        return len(self.tokenizer)


def for_model_text(tokenizer: Any, text_preprocess: Any) -> Any:
    """The tokenizer, cleaning captions first where the model's text preprocessing says so."""
    base = tokenizer.tokenizer if isinstance(tokenizer, CleaningTokenizer) else tokenizer
    return base if text_preprocess.clean == "none" else CleaningTokenizer(base, text_preprocess.clean)
