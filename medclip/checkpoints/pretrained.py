"""Pretrained towers paired into a FlaxHybridCLIP (`load_from_towers`, `load_tower`), and the public entry points
for whole checkpoints, kept here so callers import one module.

Whole checkpoints: `load_hybrid` (medclip.checkpoints.formats) recognises our / transformers' dual-encoder and
CLIPModel layouts (hf_layout), OpenCLIP hub folders and state dicts (openclip) and PMC-CLIP's (pmc_clip); saving
writes our layout (`save_hybrid`) or OpenCLIP's (`openclip.save_open_clip`).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medclip.checkpoints import conversion
from medclip.checkpoints.assembly import (WEIGHTS, abstract_model, collapse_double_prefixes, fill, load_tensors,
                                          native_format, param_shapes)
from medclip.checkpoints.formats import load_hybrid
from medclip.checkpoints.hf_config import infer_model_type, read_config_json
from medclip.checkpoints.hf_layout import hybrid_rules, model_tensors_hf, save_hybrid
from medclip.checkpoints.hub import resolve_model_dir
from medclip.checkpoints.readers import CheckpointError
from medclip.models import registry
from medclip.models.config_base import TextTowerConfig
from medclip.models.fusion import MLMFusion
from medclip.models.heads import build_head
from medclip.models.hybrid import HybridCLIPConfig, text_config_from_hf_dict, vision_config_from_hf_dict
from medclip.models.preprocess import Preprocess

logger = logging.getLogger(__name__)


def _tower_values(tensors: dict[str, np.ndarray], tower_config: Any, fmt: str, our_prefix: str,
                  shapes: dict[str, tuple[int, ...]], source: str,
                  fresh: dict[str, jax.Array] | None = None) -> dict[str, np.ndarray]:
    """Picks the key prefix under which the tower lives in the checkpoint (a BertForMaskedLM's `bert.`,
    a full CLIP's `vision_model.`), converts those keys and reports mismatches; other towers' keys in
    the same file are skipped, and said so."""
    spec = registry.tower_for_config(tower_config)
    tower_rules_ = spec.rules(tower_config, fmt)
    prefixes = spec.prefixes[fmt]
    tower_shapes = {k[len(our_prefix):]: s for k, s in shapes.items() if k.startswith(our_prefix)}

    def matches(prefix: str) -> int:
        return sum(1 for k in tensors if k.startswith(prefix) and
                   any(r.match_hf(conversion.normalize_hf_key(k[len(prefix):])) for r in tower_rules_))

    prefix = max(prefixes, key=matches)
    if matches(prefix) == 0:
        raise conversion.WeightMismatchError(f"{source}: no weights of this tower found (looked under prefixes "
                                       f"{[p or '<none>' for p in prefixes]}); is it the right checkpoint?")
    selected = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if prefix and len(selected) < len(tensors):
        logger.info("%s: using the %d keys under %r, skipping %d others", source, len(selected), prefix,
                    len(tensors) - len(selected))
    fresh = fresh or {}
    ignored = re.compile(spec.ignored_keys) if spec.ignored_keys else None
    skipped = sorted(k for k in selected if ignored is not None and ignored.search(k))
    if skipped:
        logger.info("%s: skipping %d keys the tower does not use (%s ...)", source, len(skipped), skipped[0])
    values = conversion.to_ours(selected, tower_rules_, tower_shapes, source=source, optional=fresh, ignored=ignored)
    for key in sorted(set(fresh) - set(values)):
        logger.warning("%s has no %s%s: it starts freshly initialised and is trained from scratch",
                       source, our_prefix, key)
        values[key] = fresh[key]
    return {our_prefix + k: v for k, v in values.items()}


def _fresh_pooler(config: TextTowerConfig, seed: int) -> dict[str, jax.Array]:
    """A masked-LM checkpoint (BertForMaskedLM) has no pooler; transformers then initialises one at random
    with a warning, and so do we."""
    if not config.has_pooler:
        return {}
    pooler = nnx.Linear(config.hidden_size, config.hidden_size, rngs=nnx.Rngs(seed + 1))
    return {"pooler.kernel": pooler.kernel[...], "pooler.bias": pooler.bias[...]}


def fresh_heads(config: HybridCLIPConfig, seed: int) -> dict[str, jax.Array]:
    """Fresh projections, temperature and bias for a model assembled from separately trained towers: the
    model's own initialisers, seeded."""
    rngs = nnx.Rngs(seed)
    heads = {"logit_scale": jnp.asarray(config.logit_scale_init_value, jnp.float32)}
    text_width = config.text_config.hidden_size * config.text_inputs
    for name, width, head in (("visual_projection", config.vision_config.hidden_size, config.vision_head),
                              ("text_projection", text_width, config.text_head)):
        module = build_head(width, head, config.projection_dim, dtype=jnp.float32, rngs=rngs)
        if module is not None:
            for path, value in nnx.to_flat_state(nnx.state(module, nnx.Param)):
                heads[".".join([name, *map(str, path)])] = value[...]
    if config.logit_bias_init_value is not None:
        heads["logit_bias"] = jnp.asarray(config.logit_bias_init_value, jnp.float32)
    return {**heads, **fresh_fusion(config, seed)}


def fresh_fusion(config: HybridCLIPConfig, seed: int) -> dict[str, jax.Array]:
    """A fresh fusion module + MLM head (`fusion.*`), or {} for a model without one."""
    if config.fusion is None:
        return {}
    module = MLMFusion(config.fusion, config.text_config.hidden_size, config.projection_dim,
                       config.text_config.vocab_size, dtype=jnp.float32, rngs=nnx.Rngs(seed + 2))
    return {".".join(["fusion", *map(str, path)]): value[...]
            for path, value in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def timm_vision_config(data: dict[str, Any], source: str) -> tuple[Any, Preprocess | None]:
    """A timm hub `config.json` (`architecture`, `model_args`, `pretrained_cfg`): the tower config of
    `timm.create_model(architecture, **model_args)` and the normalisation its pretrained_cfg names."""
    kwargs = dict(data.get("model_args") or {})
    pretrained = data.get("pretrained_cfg") or {}
    if "img_size" not in kwargs and pretrained.get("input_size"):
        kwargs["img_size"] = int(pretrained["input_size"][-1])
    try:
        config = registry.vision_config_from_timm(data["architecture"], **kwargs)
    except registry.UnknownArchitectureError as e:
        raise registry.UnknownArchitectureError(f"{source}: {e}") from None
    preprocess = (Preprocess(mean=tuple(pretrained["mean"]), std=tuple(pretrained["std"]))
                  if "mean" in pretrained and "std" in pretrained else None)
    return config, preprocess


def pretrained_tower_config(folder: str | os.PathLike, kind: str, overrides: dict | None = None,
                            name: str | None = None) -> tuple[Any, Preprocess | None]:
    """The tower config of a local checkpoint folder's config.json (`kind` "vision" or "text"; a whole CLIP
    config gives its tower's; a timm config.json its architecture's), with `overrides` applied (`image_size`
    interpolates position embeddings), and the preprocessing the folder names (timm's pretrained_cfg) or None.
    `name` (the Hub id, default the folder) helps infer a missing model_type."""
    data = read_config_json(Path(folder))
    name = name or str(folder)
    preprocess = None
    if kind == "vision" and "model_type" not in data and "architecture" in data:  # a timm model's config.json
        config, preprocess = timm_vision_config(data, str(Path(folder) / "config.json"))
    elif kind == "vision":
        data.setdefault("model_type", infer_model_type(data, name))
        config = vision_config_from_hf_dict(data)
    else:
        data["model_type"] = infer_model_type(data, name)
        config = text_config_from_hf_dict(data)
    return config.replace(**(overrides or {})), preprocess


def load_tower(model: nnx.Module, kind: str, name_or_path: str | os.PathLike, *, seed: int = 0,
               revision: str | None = None) -> nnx.Module:
    """Loads one pretrained tower ("vision" or "text") into `model` in place, the way `load_from_towers`
    loads each: the model's `{kind}_config` must be the checkpoint's (`pretrained_tower_config`); everything
    else in the model (the other tower, the heads) keeps its values. Returns the model."""
    folder = resolve_model_dir(name_or_path, revision=revision)
    tower_config = getattr(model.config, f"{kind}_config")
    tensors, source = load_tensors(folder)
    fresh = _fresh_pooler(tower_config, seed) if kind == "text" else None
    values = _tower_values(collapse_double_prefixes(tensors), tower_config, native_format(tower_config),
                           f"{kind}_model.", param_shapes(model), source, fresh=fresh)
    state = nnx.state(model, WEIGHTS)
    leaves = [(path, variable.replace(jnp.asarray(values[key], dtype=variable.dtype)) if key in values
               else variable) for path, variable in nnx.to_flat_state(state)
              for key in [".".join(map(str, path))]]
    nnx.update(model, nnx.from_flat_state(leaves))
    return model


def load_from_towers(cls, text_name_or_path: str | os.PathLike, vision_name_or_path: str | os.PathLike, *,
                     model_fields: Mapping[str, Any] | None = None, vision_config_overrides: dict | None = None,
                     text_config_overrides: dict | None = None, dtype=jnp.float32, remat: bool = False,
                     seed: int = 0, revision: str | None = None) -> nnx.Module:
    """Pairs a pretrained vision tower (a full CLIP checkpoint or a vision-only one) with a pretrained text
    encoder; projections and temperature start fresh, as in transformers' `from_vision_text_pretrained`.
    `model_fields`: HybridCLIPConfig's fields around the towers (projection_dim, heads, logit scale and bias,
    text_inputs, fusion). `vision_config_overrides={"image_size": 336}` interpolates the position embeddings."""
    vision_dir = resolve_model_dir(vision_name_or_path, revision=revision)
    text_dir = resolve_model_dir(text_name_or_path, revision=revision)
    vision_config, preprocess = pretrained_tower_config(vision_dir, "vision", vision_config_overrides,
                                                        str(vision_name_or_path))
    text_config, _ = pretrained_tower_config(text_dir, "text", text_config_overrides, str(text_name_or_path))
    config = HybridCLIPConfig(vision_config=vision_config, text_config=text_config, preprocess=preprocess,
                              **{k: v for k, v in (model_fields or {}).items() if v is not None})
    abstract = abstract_model(cls, config, dtype, remat)
    shapes = param_shapes(abstract)
    vision_tensors, vision_source = load_tensors(vision_dir)
    text_tensors, text_source = load_tensors(text_dir)
    values = {
        **_tower_values(collapse_double_prefixes(vision_tensors), vision_config, native_format(vision_config),
                        "vision_model.", shapes, vision_source),
        **_tower_values(collapse_double_prefixes(text_tensors), text_config, native_format(text_config),
                        "text_model.", shapes, text_source, fresh=_fresh_pooler(text_config, seed)),
        **fresh_heads(config, seed),
    }
    return fill(abstract, values)


__all__ = ["CheckpointError", "hybrid_rules", "load_from_towers", "load_tower", "pretrained_tower_config", "load_hybrid",
           "save_hybrid", "model_tensors_hf"]
