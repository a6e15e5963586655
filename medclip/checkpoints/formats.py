"""Which checkpoint format a file or folder holds, and its loader: the one place that knows every format.

Two ordered tables of (recognise, load) pairs, the first match wins. A weights file is read once, unwrapped from
a training checkpoint, then recognised by its keys (and the model config given with it). A folder is recognised
by its files; an OpenCLIP hub folder names a weights file and its model config, which the file table then loads
(PMC-CLIP saved in OpenCLIP's hub layout is still PMC-CLIP). Adding a format: a module with its recogniser and
loader, and one row here."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from medclip.checkpoints import big_vision, hf_layout, openclip, pmc_clip
from medclip.checkpoints.assembly import state_dict_from_checkpoint
from medclip.checkpoints.hub import resolve_model_dir, resolve_model_name
from medclip.checkpoints.readers import read_checkpoint

HF_HUB_PREFIX = "hf-hub:"
Spec = str | os.PathLike | dict | None  # an OpenCLIP model config: a name, a JSON file or a dict

# (recognise(spec, tensors), load(cls, tensors, spec, source, *, dtype, remat, preprocess_cfg)); OpenCLIP's
# state dict is the fallback: its loader asks for a model config when none was given.
STATE_DICT_FORMATS: list[tuple[Callable[[Spec, dict[str, np.ndarray]], bool], Callable[..., nnx.Module]]] = [
    (pmc_clip.recognise_state_dict, pmc_clip.load_tensors),
    (big_vision.recognise_state_dict, big_vision.load_tensors),  # a SigLIP .npz: '/'-joined img/ and txt/ keys
    (lambda spec, tensors: True, openclip.load_state_dict),
]


def load_state_dict_file(cls, path: Path, spec: Spec, *, dtype=jnp.float32, remat: bool = False,
                         preprocess_cfg: dict | None = None) -> nnx.Module:
    """A bare state dict (.pt / .bin / .safetensors, possibly a training checkpoint; read without executing
    pickled code) with the model config `spec` names, if any."""
    tensors = state_dict_from_checkpoint(read_checkpoint(path), str(path))
    load = next(load for recognise, load in STATE_DICT_FORMATS if recognise(spec, tensors))
    return load(cls, tensors, spec, str(path), dtype=dtype, remat=remat, preprocess_cfg=preprocess_cfg)


def _load_open_clip_folder(cls, folder: Path, spec: Spec, *, dtype=jnp.float32, remat: bool = False) -> nnx.Module:
    weights, model_cfg, preprocess_cfg = openclip.read_folder(folder)
    return load_state_dict_file(cls, weights, model_cfg, dtype=dtype, remat=remat, preprocess_cfg=preprocess_cfg)


# (recognise(folder), load(cls, folder, spec, *, dtype, remat))
FOLDER_FORMATS: list[tuple[Callable[[Path], bool], Callable[..., nnx.Module]]] = [
    (pmc_clip.has_parts, pmc_clip.load_parts),
    (openclip.is_folder, _load_open_clip_folder),
    (hf_layout.is_folder, hf_layout.load_folder),
]


def load_hybrid(cls, name_or_path: str | os.PathLike, *, dtype=jnp.float32, remat: bool = False,
                revision: str | None = None, open_clip_model: Spec = None) -> nnx.Module:
    """Any supported layout, recognised from the files. A bare OpenCLIP state dict (`.pt`, `.bin`,
    `.safetensors`, possibly a training checkpoint) needs `open_clip_model`: a model config name (`ViT-B-32`),
    a JSON file or a dict."""
    name = resolve_model_name(name_or_path).removeprefix(HF_HUB_PREFIX)  # PMC_CLIP:beta -> its cached checkpoint.pt
    path = Path(name).expanduser()
    if path.is_file():
        return load_state_dict_file(cls, path, open_clip_model, dtype=dtype, remat=remat)
    folder = resolve_model_dir(name, revision=revision)
    for recognise, load in FOLDER_FORMATS:
        if recognise(folder):
            return load(cls, folder, open_clip_model, dtype=dtype, remat=remat)
    raise FileNotFoundError(f"{folder} has no config.json (nor {openclip.OPEN_CLIP_CONFIG}, nor PMC-CLIP's "
                            f"{', '.join(pmc_clip.PART_FILES.values())})")

