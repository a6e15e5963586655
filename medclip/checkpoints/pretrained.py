"""Loading and saving FlaxHybridCLIP in every layout our users start from.

`load_hybrid` recognises, from the files: our / transformers' VisionTextDualEncoder layout (and the original
flax-community `hybrid-clip`), a whole transformers `CLIPModel` (towers, projections, temperature), an OpenCLIP
hub folder (`open_clip_config.json` + weights), and a bare OpenCLIP state dict given with its model config
(medclip.checkpoints.openclip). Saving writes a `CLIPModel` when both towers and heads are CLIP's, otherwise
the dual-encoder layout; `save_open_clip` writes OpenCLIP's.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medclip.checkpoints import conversion as conv
from medclip.checkpoints.hub import resolve_model_dir, resolve_model_name
from medclip.checkpoints.readers import CheckpointError, find_checkpoint_file, read_checkpoint
from medclip.models import registry
from medclip.models.bert import BertConfig
from medclip.models.fusion import FusionConfig, MLMFusion, fusion_rules
from medclip.models.heads import HeadConfig, build_head
from medclip.models.hybrid import HybridCLIPConfig, text_config_from_hf_dict, vision_config_from_hf_dict
from medclip.models.preprocess import Preprocess
from medclip.models.weights import Rule

logger = logging.getLogger(__name__)
OPEN_CLIP_CONFIG = "open_clip_config.json"


def native_format(config: Any) -> str:
    """The format a tower is saved in inside our layout: transformers' naming where it has one."""
    formats = registry.tower_for_config(config).formats()
    return "hf" if "hf" in formats else formats[0]


def head_rules(ckpt: str, ours: str, head: HeadConfig, *, raw: bool = False,
               mlp_names: tuple[str, str] = ("fc1", "fc2")) -> list[Rule]:
    """A head under `ckpt`: transformers-style by default (`visual_projection.weight`, `.fc1`/`.fc2` for an MLP).
    OpenCLIP's spellings: `raw`, a bias-free linear head stored as an (in, out) parameter used as `x @ W`
    (CLIP's proj / text_projection); `mlp_names`, its MLP layers (nn.Sequential's 0 / 2 for the HF text head)."""
    if head.type == "none":
        return []
    if head.type == "linear":
        if raw and not head.bias:
            return [Rule(ckpt, f"{ours}.kernel")]
        return conv.linear(ckpt, ours, bias=head.bias)
    first, second = mlp_names
    return [*conv.linear(f"{ckpt}.{first}", f"{ours}.fc1", bias=head.hidden_bias),
            *conv.linear(f"{ckpt}.{second}", f"{ours}.fc2", bias=head.bias)]


def tower_rules(config: Any, fmt: str) -> list[Rule]:
    return registry.tower_for_config(config).rules(config, fmt)


def hybrid_rules(config: HybridCLIPConfig) -> list[Rule]:
    """The VisionTextDualEncoderModel / CLIPModel layout."""
    return [
        *conv.prefixed("vision_model.", tower_rules(config.vision_config, native_format(config.vision_config)),
                       "vision_model."),
        *conv.prefixed("text_model.", tower_rules(config.text_config, native_format(config.text_config)),
                       "text_model."),
        *head_rules("visual_projection", "visual_projection", config.vision_head),
        *head_rules("text_projection", "text_projection", config.text_head),
        conv.Rule("logit_scale", "logit_scale"),
        conv.Rule("logit_bias", "logit_bias"),
        *(fusion_rules(config.fusion) if config.fusion is not None else []),  # PMC-CLIP's names
    ]


def read_config_json(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json (nor {OPEN_CLIP_CONFIG})")
    return read_json(path)


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def infer_model_type(data: dict[str, Any], name: str) -> str:
    """Old checkpoints (SciBERT's, for one) have no `model_type`; transformers then guesses from the
    architecture list or the repo name, and so do we, in the same order of specificity."""
    if data.get("model_type"):
        return data["model_type"]
    hints = " ".join(data.get("architectures") or []).lower() + " " + name.lower()
    for model_type in ("distilbert", "xlm-roberta", "roberta", "bert", "clip"):
        if model_type.replace("-", "") in hints.replace("-", ""):
            return model_type
    raise ValueError(f"{name}: config.json has no model_type and none can be inferred from its name or "
                     "architectures; add \"model_type\" to config.json")


def load_tensors(folder: Path) -> tuple[dict[str, np.ndarray], str]:
    """Reads a folder's weights in PyTorch naming (legacy Flax msgpack keys are renamed)."""
    path = find_checkpoint_file(folder)
    tensors = read_checkpoint(path)
    if path.name.endswith(".msgpack"):
        tensors = conv.flax_to_hf_keys(tensors)
    return tensors, str(path)


# What a checkpoint holds: parameters and running statistics (BatchNorm's), both loaded and saved.
WEIGHTS = (nnx.Param, nnx.BatchStat)


def param_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    return {".".join(map(str, path)): tuple(v.shape)
            for path, v in nnx.to_flat_state(nnx.state(model, WEIGHTS))}


def _collapse_double_prefixes(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers 4.x saved `vision_model.vision_model.*` (and the Flax hybrid did too)."""
    out = {}
    for key, value in tensors.items():
        for tower in ("vision_model.", "text_model."):
            if key.startswith(tower + tower):
                key = key[len(tower):]
        out[key] = value
    return out


def fill(abstract: nnx.Module, values: dict[str, np.ndarray | jax.Array]) -> nnx.Module:
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    leaves = []
    for path, variable in flat:
        key = ".".join(map(str, path))
        if key not in values:
            raise conv.WeightMismatchError(f"no value for parameter {key}")
        leaves.append((path, variable.replace(jnp.asarray(values[key], dtype=variable.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def abstract_model(cls, config: HybridCLIPConfig, dtype=jnp.float32, remat: bool = False) -> nnx.Module:
    return nnx.eval_shape(lambda: cls(config, dtype=dtype, remat=remat, rngs=nnx.Rngs(0)))


def build_from_tensors(cls, config: HybridCLIPConfig, tensors: dict[str, np.ndarray], rules: list[Rule], *,
                       source: str, dtype=jnp.float32, remat: bool = False, ignored=None) -> nnx.Module:
    abstract = abstract_model(cls, config, dtype, remat)
    values = conv.to_ours(tensors, rules, param_shapes(abstract), source=source, ignored=ignored)
    return fill(abstract, values)


def load_hybrid(cls, name_or_path: str | os.PathLike, *, dtype=jnp.float32, remat: bool = False,
                revision: str | None = None, open_clip_model: str | os.PathLike | dict | None = None) -> nnx.Module:
    """Any supported layout, recognised from the files. A bare OpenCLIP state dict (`.pt`, `.bin`,
    `.safetensors`, possibly a training checkpoint) needs `open_clip_model`: a model config name (`ViT-B-32`),
    a JSON file or a dict."""
    from medclip.checkpoints import openclip

    name = resolve_model_name(name_or_path)  # PMC_CLIP:beta -> its cached checkpoint.pt
    if name.startswith(openclip.HF_HUB_PREFIX):
        name = name[len(openclip.HF_HUB_PREFIX):]
    path = Path(name).expanduser()
    if path.is_file():
        return openclip.load_state_dict_file(cls, path, open_clip_model, dtype=dtype, remat=remat)
    folder = resolve_model_dir(name, revision=revision)
    from medclip.checkpoints import pmc_clip

    if pmc_clip.has_parts(folder):
        return pmc_clip.load_parts(cls, folder, open_clip_model, dtype=dtype, remat=remat)
    if (folder / OPEN_CLIP_CONFIG).is_file() and not (folder / "config.json").is_file():
        return openclip.load_folder(cls, folder, dtype=dtype, remat=remat)
    config = HybridCLIPConfig.from_dict(read_config_json(folder))
    tensors, source = load_tensors(folder)
    return build_from_tensors(cls, config, _collapse_double_prefixes(tensors), hybrid_rules(config), source=source,
                              dtype=dtype, remat=remat)


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
                   any(r.match_hf(conv.normalize_hf_key(k[len(prefix):])) for r in tower_rules_))

    prefix = max(prefixes, key=matches)
    if matches(prefix) == 0:
        raise conv.WeightMismatchError(f"{source}: no weights of this tower found (looked under prefixes "
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
    values = conv.to_ours(selected, tower_rules_, tower_shapes, source=source, optional=fresh, ignored=ignored)
    for key in sorted(set(fresh) - set(values)):
        logger.warning("%s has no %s%s: it starts freshly initialised and is trained from scratch",
                       source, our_prefix, key)
        values[key] = fresh[key]
    return {our_prefix + k: v for k, v in values.items()}


def _fresh_pooler(config: Any, seed: int) -> dict[str, jax.Array]:
    """A masked-LM checkpoint (BertForMaskedLM) has no pooler; transformers then initialises one at random
    with a warning, and so do we."""
    if not (isinstance(config, BertConfig) and config.has_pooler):
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
    values = _tower_values(_collapse_double_prefixes(tensors), tower_config, native_format(tower_config),
                           f"{kind}_model.", param_shapes(model), source, fresh=fresh)
    state = nnx.state(model, WEIGHTS)
    leaves = [(path, variable.replace(jnp.asarray(values[key], dtype=variable.dtype)) if key in values
               else variable) for path, variable in nnx.to_flat_state(state)
              for key in [".".join(map(str, path))]]
    nnx.update(model, nnx.from_flat_state(leaves))
    return model


def load_from_towers(cls, text_name_or_path: str | os.PathLike, vision_name_or_path: str | os.PathLike, *,
                     projection_dim: int = 512, logit_scale_init_value: float = math.log(1 / 0.07),
                     logit_bias_init_value: float | None = None, vision_config_overrides: dict | None = None,
                     text_config_overrides: dict | None = None, vision_head: HeadConfig | None = None,
                     text_head: HeadConfig | None = None, text_inputs: int = 1, fusion: FusionConfig | None = None,
                     dtype=jnp.float32, remat: bool = False, seed: int = 0,
                     revision: str | None = None) -> nnx.Module:
    """Pairs a pretrained vision tower (a full CLIP checkpoint or a vision-only one) with a pretrained text
    encoder; projections and temperature start fresh, as in transformers' `from_vision_text_pretrained`.
    `vision_config_overrides={"image_size": 336}` interpolates the position embeddings."""
    vision_dir = resolve_model_dir(vision_name_or_path, revision=revision)
    text_dir = resolve_model_dir(text_name_or_path, revision=revision)
    vision_config, preprocess = pretrained_tower_config(vision_dir, "vision", vision_config_overrides,
                                                        str(vision_name_or_path))
    text_config, _ = pretrained_tower_config(text_dir, "text", text_config_overrides, str(text_name_or_path))
    config = HybridCLIPConfig(vision_config=vision_config, text_config=text_config,
                              projection_dim=projection_dim, logit_scale_init_value=logit_scale_init_value,
                              logit_bias_init_value=logit_bias_init_value,
                              vision_head=vision_head or HeadConfig(), text_head=text_head or HeadConfig(),
                              preprocess=preprocess, text_inputs=text_inputs, fusion=fusion)
    abstract = abstract_model(cls, config, dtype, remat)
    shapes = param_shapes(abstract)
    vision_tensors, vision_source = load_tensors(vision_dir)
    text_tensors, text_source = load_tensors(text_dir)
    values = {
        **_tower_values(_collapse_double_prefixes(vision_tensors), vision_config, native_format(vision_config),
                        "vision_model.", shapes, vision_source),
        **_tower_values(_collapse_double_prefixes(text_tensors), text_config, native_format(text_config),
                        "text_model.", shapes, text_source, fresh=_fresh_pooler(text_config, seed)),
        **fresh_heads(config, seed),
    }
    return fill(abstract, values)


def model_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
    """Our parameters and running statistics as fp32 NumPy arrays under our keys; refuses non-finite values."""
    ours = {".".join(map(str, p)): np.asarray(v[...], dtype=np.float32)
            for p, v in nnx.to_flat_state(nnx.state(model, WEIGHTS))}
    bad = [k for k, v in ours.items() if not np.all(np.isfinite(v))]
    if bad:
        raise ValueError(f"refusing to save non-finite parameters: {bad[:10]}{' ...' if len(bad) > 10 else ''}")
    return ours


def model_tensors_hf(model: nnx.Module) -> dict[str, np.ndarray]:
    """Our parameters renamed to transformers' VisionTextDualEncoderModel / CLIPModel keys."""
    return conv.to_hf(model_tensors(model), hybrid_rules(model.config))


def save_hybrid(model: nnx.Module, save_directory: str | os.PathLike, *, tokenizer: Any = None) -> None:
    from safetensors.numpy import save_file

    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = model_tensors_hf(model)
    model.config.to_json_file(folder / "config.json")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


__all__ = ["CheckpointError", "load_from_towers", "load_tower", "pretrained_tower_config", "load_hybrid", "save_hybrid", "model_tensors_hf"]
