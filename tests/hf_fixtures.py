"""Tiny transformers (PyTorch) models with random weights, saved as Hugging Face folders, for parity tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)


def randomize(model, seed: int = 0) -> None:
    """transformers initialises LayerNorms to (1, 0) and biases to 0, which would hide mapping mistakes."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)


def hf_text_config(model_type: str):
    import transformers as tf

    if model_type == "bert":
        return tf.BertConfig(vocab_size=99, max_position_embeddings=40, **TINY)
    if model_type == "roberta":
        return tf.RobertaConfig(vocab_size=99, max_position_embeddings=42, type_vocab_size=1, pad_token_id=1,
                                bos_token_id=0, eos_token_id=2, **TINY)
    if model_type == "distilbert":
        return tf.DistilBertConfig(vocab_size=99, max_position_embeddings=40, dim=32, hidden_dim=48, n_layers=2,
                                   n_heads=4)
    if model_type == "clip_text_model":
        return tf.CLIPTextConfig(vocab_size=99, max_position_embeddings=16, bos_token_id=97, eos_token_id=98,
                                 pad_token_id=1, **TINY)
    raise ValueError(model_type)


def hf_vision_config(image_size: int = 32, patch_size: int = 8):
    import transformers as tf

    return tf.CLIPVisionConfig(image_size=image_size, patch_size=patch_size, **TINY)


def make_dual_encoder(text_type: str, seed: int = 0, projection_dim: int = 16):
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.VisionTextDualEncoderConfig.from_vision_text_configs(
        hf_vision_config(), hf_text_config(text_type), projection_dim=projection_dim)
    model = tf.VisionTextDualEncoderModel(config).eval()
    randomize(model, seed)
    return model


def text_inputs(text_type: str, batch: int = 3, length: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token ids with real padding (ragged lengths), and EOS where CLIP pools."""
    rng = np.random.default_rng(seed)
    pad = 1 if text_type in ("roberta", "clip_text_model") else 0
    ids = rng.integers(3, 90, size=(batch, length))
    mask = np.zeros((batch, length), np.int64)
    for row, n in enumerate(np.linspace(length, length // 2, batch).astype(int)):
        mask[row, :n] = 1
        if text_type == "clip_text_model":
            ids[row, 0], ids[row, n - 1] = 97, 98
    ids = np.where(mask == 1, ids, pad)
    return ids.astype(np.int64), mask


def pixels(batch: int = 3, size: int = 32, seed: int = 1) -> np.ndarray:
    """NCHW float32 as transformers takes; our model takes the NHWC transpose."""
    return np.random.default_rng(seed).normal(size=(batch, 3, size, size)).astype(np.float32)


def save(model, folder: Path) -> Path:
    model.save_pretrained(str(folder))
    return folder
