"""big_vision's SigLIP `.npz` checkpoints (its `two_towers` model: `img` a ViT with the MAP head, `txt` its text
transformer with a `head` Dense, `t` the log temperature, `b` the bias) as a SigLIP model here.

big_vision writes a checkpoint as `np.savez` of its flattened parameter tree with '/'-joined names:
`params/img/Transformer/encoderblock_0/...` (released files), or the tree bare (`img/...`), or an old Flax
optimizer's `opt/target/img/...`; encoder blocks are `encoderblock_{i}` or, from models built with `scan=True`,
one `encoderblock` with the blocks stacked on axis 0. The file holds no config: every size is read from the
parameters' shapes (heads from the attention kernels' (width, heads, head_dim)). What the parameters cannot show
is taken as SigLIP's: the text tower pooled at the last position (`pool_type="last"`), padding and EOS id 1.
Options this model does not compute are refused by name: sincos2d position embeddings (no `pos_embedding`), a
ViT pooled otherwise than by the MAP head, an image `head` or `pre_logits` layer, a MAP-pooled text tower, a
checkpoint without the bias `b`.

big_vision's logits are zimg @ ztxt.T * exp(t) + b, each embedding divided by its norm + 1e-8 (ours: by its norm;
the difference is 1e-8 relative). Its images: `resize(res)|value_range(-1, 1)`, TF bilinear squash to the
tower's square size, mean = std = 0.5: the preprocessing saved with the model (`tf_bilinear`; big_vision's resize
is not antialiased, ours antialiases shrinks of 2x or more).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from medclip.checkpoints.assembly import abstract_model, fill, param_shapes
from medclip.checkpoints.conversion import WeightMismatchError
from medclip.models.hybrid import HybridCLIPConfig
from medclip.models.preprocess import SIGLIP_PREPROCESS
from medclip.models.siglip_text import SiglipTextConfig
from medclip.models.siglip_vision import SiglipVisionConfig
from medclip.models.tower_contract import UnsupportedOptionError

logger = logging.getLogger(__name__)

PREFIXES = ("params/", "opt/target/", "")
PAD_ID = EOS_ID = 1  # big_vision's SigLIP tokenisation: pad_value=1, sticky EOS 1
PREPROCESS = SIGLIP_PREPROCESS.replace(resample="tf_bilinear")
LAYER_NORM_EPS = 1e-6  # flax.linen.LayerNorm's default
_BLOCK = re.compile(r"^encoderblock_(\d+)/")


def _strip(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """The two_towers parameters without their checkpoint prefix, or None when this is not such a file."""
    for prefix in PREFIXES:
        if any(k.startswith(prefix + "img/") for k in tensors) and any(k.startswith(prefix + "txt/")
                                                                        for k in tensors):
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return None


def recognise_state_dict(spec: Any, tensors: dict[str, np.ndarray]) -> bool:
    """A big_vision two_towers checkpoint: '/'-joined `img/` and `txt/` keys (under `params/` when released)."""
    del spec
    return _strip(tensors) is not None


class _Params(dict):
    """A group of the checkpoint's parameters that records every full key read from it, so that a parameter
    the mapping does not read is an error rather than silently dropped."""

    def __init__(self, items: dict[str, np.ndarray], prefix: str = "", read: set[str] | None = None):
        super().__init__(items)
        self.prefix, self.read = prefix, set() if read is None else read

    def __getitem__(self, key: str) -> np.ndarray:
        self.read.add(self.prefix + key)
        return super().__getitem__(key)


def _sub(params: _Params, prefix: str) -> _Params:
    return _Params({k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}, params.prefix + prefix,
                   params.read)


def _blocks(encoder: _Params, source: str, tower: str) -> list[_Params]:
    """The encoder blocks' parameters in order, from python-loop (`encoderblock_{i}`) or scan (`encoderblock`)
    checkpoints alike."""
    stacked = _sub(encoder, "encoderblock/")
    if stacked:
        depth = {v.shape[0] for v in stacked.values()}
        if len(depth) != 1:
            raise WeightMismatchError(f"{source}: {tower}'s scanned encoderblock has unequal depths {sorted(depth)}")
        return [_Params({k: v[i] for k, v in stacked.items()}, stacked.prefix, stacked.read)
                for i in range(depth.pop())]
    indices = sorted({int(m.group(1)) for k in encoder if (m := _BLOCK.match(k))})
    if indices != list(range(len(indices))) or not indices:
        raise WeightMismatchError(f"{source}: {tower} has encoder blocks {indices}, expected 0..n-1")
    return [_sub(encoder, f"encoderblock_{i}/") for i in indices]


def _heads(attention: _Params) -> int:
    return int(attention["query/kernel"].shape[1])  # flax DenseGeneral: (width, heads, head_dim)


def _attention(attention: _Params, ours: str, out: dict[str, np.ndarray]) -> None:
    """flax MultiHeadDotProductAttention (per-head DenseGeneral kernels) onto our q/k/v/out projections."""
    for theirs, name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        kernel = attention[f"{theirs}/kernel"]
        out[f"{ours}.{name}.kernel"] = kernel.reshape(kernel.shape[0], -1)
        out[f"{ours}.{name}.bias"] = attention[f"{theirs}/bias"].reshape(-1)
    kernel = attention["out/kernel"]
    out[f"{ours}.out_proj.kernel"] = kernel.reshape(-1, kernel.shape[-1])
    out[f"{ours}.out_proj.bias"] = attention["out/bias"]


def _norm(params: _Params, theirs: str, ours: str, out: dict[str, np.ndarray]) -> None:
    out[f"{ours}.scale"], out[f"{ours}.bias"] = params[f"{theirs}/scale"], params[f"{theirs}/bias"]


def _dense(params: _Params, theirs: str, ours: str, out: dict[str, np.ndarray]) -> None:
    out[f"{ours}.kernel"], out[f"{ours}.bias"] = params[f"{theirs}/kernel"], params[f"{theirs}/bias"]


def _mlp(params: _Params, ours: str, out: dict[str, np.ndarray]) -> None:
    _dense(params, "MlpBlock_0/Dense_0", f"{ours}.fc1", out)
    _dense(params, "MlpBlock_0/Dense_1", f"{ours}.fc2", out)


def _encoder(blocks: list[_Params], ours: str, out: dict[str, np.ndarray]) -> None:
    for i, block in enumerate(blocks):
        layer = f"{ours}.encoder.layers.{i}"
        _norm(block, "LayerNorm_0", f"{layer}.layer_norm1", out)
        _attention(_sub(block, "MultiHeadDotProductAttention_0/"), f"{layer}.self_attn", out)
        _norm(block, "LayerNorm_1", f"{layer}.layer_norm2", out)
        _mlp(block, f"{layer}.mlp", out)


def _refuse(source: str, what: str) -> None:
    raise UnsupportedOptionError(f"{source}: a big_vision two_towers checkpoint with {what} is not supported "
                                 "(SigLIP's towers: learned position embeddings, a MAP-pooled ViT without an "
                                 "image head, a text transformer pooled at its last position with a head)")


def _vision(img: _Params, source: str, out: dict[str, np.ndarray]) -> SiglipVisionConfig:
    if "pos_embedding" not in img:
        _refuse(source, "posemb sincos2d (no img/pos_embedding)")
    if "cls" in img:
        _refuse(source, "pool_type tok (a class token, img/cls)")
    if "MAPHead_0/probe" not in img:
        _refuse(source, "an image tower pooled without the MAP head (pool_type gap or 0: no img/MAPHead_0)")
    for name, option in (("head/kernel", "an image head (out_dim set for the image tower)"),
                         ("pre_logits/kernel", "an image pre_logits layer (rep_size)")):
        if name in img:
            _refuse(source, option)
    patch, _, channels, width = img["embedding/kernel"].shape
    tokens = img["pos_embedding"].shape[1]
    grid = int(round(tokens ** 0.5))
    if grid * grid != tokens:
        _refuse(source, f"{tokens} position embeddings (not a square patch grid)")
    blocks = _blocks(_sub(img, "Transformer/"), source, "img")
    attention = _sub(blocks[0], "MultiHeadDotProductAttention_0/")
    config = SiglipVisionConfig(hidden_size=width, intermediate_size=int(blocks[0]["MlpBlock_0/Dense_0/kernel"].shape[1]),
                                num_hidden_layers=len(blocks), num_attention_heads=_heads(attention),
                                num_channels=channels, image_size=grid * patch, patch_size=patch,
                                layer_norm_eps=LAYER_NORM_EPS)
    out["vision_model.embeddings.patch_embedding"] = img["embedding/kernel"]
    out["vision_model.embeddings.patch_bias"] = img["embedding/bias"]
    out["vision_model.embeddings.position_embedding.embedding"] = img["pos_embedding"].reshape(tokens, width)
    _encoder(blocks, "vision_model", out)
    _norm(img, "Transformer/encoder_norm", "vision_model.post_layernorm", out)
    out["vision_model.head.probe"] = img["MAPHead_0/probe"]
    _attention(_sub(img, "MAPHead_0/MultiHeadDotProductAttention_0/"), "vision_model.head.attention", out)
    _norm(img, "MAPHead_0/LayerNorm_0", "vision_model.head.layernorm", out)
    _mlp(_sub(img, "MAPHead_0/"), "vision_model.head.mlp", out)
    return config


def _text(txt: _Params, source: str, out: dict[str, np.ndarray]) -> tuple[SiglipTextConfig, int]:
    if any(k.startswith("MAPHead_0/") for k in txt):
        _refuse(source, "a MAP-pooled text tower (pool_type map: txt/MAPHead_0)")
    if "head/kernel" not in txt:
        _refuse(source, "a text tower without its head (out_dim None for the text tower)")
    vocab, width = txt["Embed_0/embedding"].shape
    positions = txt["pos_embedding"].reshape(-1, width)
    if "Encoder_0/pos_embedding" in txt:  # older checkpoints added a second table; big_vision's loader sums them
        positions = positions + txt["Encoder_0/pos_embedding"].reshape(-1, width)
    blocks = _blocks(_sub(txt, "Encoder_0/"), source, "txt")
    attention = _sub(blocks[0], "MultiHeadDotProductAttention_0/")
    config = SiglipTextConfig(vocab_size=vocab, hidden_size=width,
                              intermediate_size=int(blocks[0]["MlpBlock_0/Dense_0/kernel"].shape[1]),
                              num_hidden_layers=len(blocks), num_attention_heads=_heads(attention),
                              max_position_embeddings=positions.shape[0], layer_norm_eps=LAYER_NORM_EPS,
                              pad_token_id=PAD_ID, bos_token_id=None, eos_token_id=EOS_ID)
    out["text_model.token_embedding.embedding"] = txt["Embed_0/embedding"]
    out["text_model.position_embedding.embedding"] = positions
    _encoder(blocks, "text_model", out)
    _norm(txt, "Encoder_0/encoder_norm", "text_model.final_layer_norm", out)
    _dense(txt, "head", "text_projection", out)
    return config, int(txt["head/kernel"].shape[1])


def config_and_values(tensors: dict[str, np.ndarray], source: str) -> tuple[HybridCLIPConfig, dict[str, np.ndarray]]:
    """The SigLIP config the parameters describe, and the parameters under our keys (float32)."""
    params = _strip(tensors)
    if params is None:
        raise WeightMismatchError(f"{source}: not a big_vision two_towers checkpoint (no img/ and txt/ keys)")
    params = _Params({k: np.asarray(v, np.float32) for k, v in params.items()})
    if "b" not in params:
        _refuse(source, "no bias b (a CLIP/LiT-style two_towers trained without the sigmoid loss's bias)")
    values: dict[str, np.ndarray] = {}
    try:
        vision = _vision(_sub(params, "img/"), source, values)
        text, projection = _text(_sub(params, "txt/"), source, values)
        values["logit_scale"] = params["t"].reshape(())
        values["logit_bias"] = params["b"].reshape(())
    except KeyError as error:
        raise WeightMismatchError(f"{source}: big_vision parameter {error.args[0]} is missing") from None
    unread = sorted(set(params) - params.read)
    if unread:
        raise WeightMismatchError(f"{source}: big_vision parameters this SigLIP does not use: {unread[:8]}"
                                  + (f" (+{len(unread) - 8} more)" if len(unread) > 8 else ""))
    config = HybridCLIPConfig.from_dict({
        "model_type": "siglip", "vision_config": vision.to_hf_dict(),
        "text_config": {**text.to_hf_dict(), "projection_size": projection},
        "logit_scale_init_value": float(values["logit_scale"]), "logit_bias_init_value": float(values["logit_bias"]),
        "medclip": {"preprocess": PREPROCESS.to_dict()}})
    return config, values


def load_tensors(cls, tensors: dict[str, np.ndarray], spec: Any, source: str, *, dtype=jnp.float32,
                 remat: bool = False, preprocess_cfg: dict | None = None) -> nnx.Module:
    """A big_vision SigLIP checkpoint's parameters (read from its `.npz`) as a model of `cls`; every parameter of
    the file is used (an unknown one is an error, not silently dropped)."""
    del spec, preprocess_cfg
    config, values = config_and_values(tensors, source)
    abstract = abstract_model(cls, config, dtype, remat)
    shapes = param_shapes(abstract)
    used = set(values)
    missing, extra = sorted(set(shapes) - used), sorted(used - set(shapes))
    if missing or extra:
        raise WeightMismatchError(f"{source}: big_vision parameters do not match the model: missing {missing[:5]}, "
                                  f"unexpected {extra[:5]}")
    for key, value in values.items():
        if tuple(value.shape) != shapes[key]:
            raise WeightMismatchError(f"{source}: {key} has shape {tuple(value.shape)}, the model {shapes[key]}")
    logger.info("%s: big_vision SigLIP, %d-layer ViT at %d px, %d-layer text tower, %d tokens", source,
                config.vision_config.num_hidden_layers, config.vision_config.image_size,
                config.text_config.num_hidden_layers, config.text_config.max_position_embeddings)
    return fill(abstract, values)
