"""The building blocks every checkpoint format assembles a model from: weight-rule tables for a tower and a
head, a model built from a state dict through such a table, and a model's weights read back for saving.

Below every format module (hf_layout, openclip, pmc_clip) and the tower loader (pretrained); imports no format."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medclip.checkpoints import conversion
from medclip.checkpoints.readers import find_checkpoint_file, read_checkpoint
from medclip.models import registry
from medclip.models.heads import HeadConfig
from medclip.models.hybrid import HybridCLIPConfig
from medclip.models.weights import Rule

logger = logging.getLogger(__name__)

# What a checkpoint holds: parameters and running statistics (BatchNorm's), both loaded and saved.
WEIGHTS = (nnx.Param, nnx.BatchStat)


def native_format(config: Any) -> str:
    """The format a tower is saved in inside our layout: transformers' naming where it has one."""
    formats = registry.tower_for_config(config).formats()
    return "hf" if "hf" in formats else formats[0]


def tower_rules(config: Any, fmt: str) -> list[Rule]:
    return registry.tower_for_config(config).rules(config, fmt)


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
        return conversion.linear(ckpt, ours, bias=head.bias)
    first, second = mlp_names
    return [*conversion.linear(f"{ckpt}.{first}", f"{ours}.fc1", bias=head.hidden_bias),
            *conversion.linear(f"{ckpt}.{second}", f"{ours}.fc2", bias=head.bias)]


def load_tensors(folder: Path) -> tuple[dict[str, np.ndarray], str]:
    """Reads a folder's weights in PyTorch naming (legacy Flax msgpack keys are renamed)."""
    path = find_checkpoint_file(folder)
    tensors = read_checkpoint(path)
    if path.name.endswith(".msgpack"):
        tensors = conversion.flax_to_hf_keys(tensors)
    return tensors, str(path)


def state_dict_from_checkpoint(tensors: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """The model's state dict inside what torch.save wrote: a bare state dict, or a training checkpoint
    `{"epoch", "state_dict", "optimizer", ...}` (the optimizer state is skipped), with DDP's `module.` prefix."""
    if any(k.startswith("state_dict.") for k in tensors):
        skipped = sorted({k.split(".", 1)[0] for k in tensors if not k.startswith("state_dict.")})
        if skipped:
            logger.info("%s: a training checkpoint; using its state_dict, skipping %s", source, skipped)
        tensors = {k[len("state_dict."):]: v for k, v in tensors.items() if k.startswith("state_dict.")}
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def collapse_double_prefixes(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers 4.x saved `vision_model.vision_model.*` (and the Flax hybrid did too)."""
    out = {}
    for key, value in tensors.items():
        for tower in ("vision_model.", "text_model."):
            if key.startswith(tower + tower):
                key = key[len(tower):]
        out[key] = value
    return out


def param_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    return {".".join(map(str, path)): tuple(v.shape)
            for path, v in nnx.to_flat_state(nnx.state(model, WEIGHTS))}


def fill(abstract: nnx.Module, values: dict[str, np.ndarray | jax.Array]) -> nnx.Module:
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    leaves = []
    for path, variable in flat:
        key = ".".join(map(str, path))
        if key not in values:
            raise conversion.WeightMismatchError(f"no value for parameter {key}")
        leaves.append((path, variable.replace(jnp.asarray(values[key], dtype=variable.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def abstract_model(cls, config: HybridCLIPConfig, dtype=jnp.float32, remat: bool = False) -> nnx.Module:
    return nnx.eval_shape(lambda: cls(config, dtype=dtype, remat=remat, rngs=nnx.Rngs(0)))


def build_from_tensors(cls, config: HybridCLIPConfig, tensors: dict[str, np.ndarray], rules: list[Rule], *,
                       source: str, dtype=jnp.float32, remat: bool = False, ignored=None) -> nnx.Module:
    abstract = abstract_model(cls, config, dtype, remat)
    values = conversion.to_ours(tensors, rules, param_shapes(abstract), source=source, ignored=ignored)
    return fill(abstract, values)


def model_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
    """Our parameters and running statistics as fp32 NumPy arrays under our keys; refuses non-finite values."""
    ours = {".".join(map(str, p)): np.asarray(v[...], dtype=np.float32)
            for p, v in nnx.to_flat_state(nnx.state(model, WEIGHTS))}
    bad = [k for k, v in ours.items() if not np.all(np.isfinite(v))]
    if bad:
        raise ValueError(f"refusing to save non-finite parameters: {bad[:10]}{' ...' if len(bad) > 10 else ''}")
    return ours
