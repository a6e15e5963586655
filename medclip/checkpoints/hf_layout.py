"""Our own layout, which is transformers' `VisionTextDualEncoderModel` (and the original flax-community
`hybrid-clip`) or, when both towers and heads are CLIP's, a whole transformers `CLIPModel`: `config.json` +
weights under `vision_model.` / `text_model.` / `visual_projection` / `text_projection` / `logit_scale`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from medclip.checkpoints import conversion
from medclip.checkpoints.assembly import (build_from_tensors, collapse_double_prefixes, head_rules, load_tensors,
                                          model_tensors, native_format, tower_rules)
from medclip.checkpoints.hf_config import CONFIG_JSON, read_config_json
from medclip.models.fusion import fusion_rules
from medclip.models.hybrid import HybridCLIPConfig
from medclip.models.preprocess import CLIP_MEAN, CLIP_STD, Preprocess
from medclip.models.weights import Rule


def hybrid_rules(config: HybridCLIPConfig) -> list[Rule]:
    """The VisionTextDualEncoderModel / CLIPModel layout; a SiglipModel's text projection is its text model's
    `head`, and its logit scale and bias are 1-element vectors."""
    if config.siglip_type is not None:
        return [*conversion.prefixed("vision_model.", tower_rules(config.vision_config, "hf"), "vision_model."),
                *conversion.prefixed("text_model.", tower_rules(config.text_config, "hf"), "text_model."),
                *head_rules("text_model.head", "text_projection", config.text_head),
                Rule("logit_scale", "logit_scale", "one"), Rule("logit_bias", "logit_bias", "one")]
    return [
        *conversion.prefixed("vision_model.", tower_rules(config.vision_config, native_format(config.vision_config)),
                             "vision_model."),
        *conversion.prefixed("text_model.", tower_rules(config.text_config, native_format(config.text_config)),
                             "text_model."),
        *head_rules("visual_projection", "visual_projection", config.vision_head),
        *head_rules("text_projection", "text_projection", config.text_head),
        Rule("logit_scale", "logit_scale"),
        Rule("logit_bias", "logit_bias"),
        *(fusion_rules(config.fusion) if config.fusion is not None else []),  # PMC-CLIP's names
    ]


def is_folder(folder: Path) -> bool:
    return (folder / CONFIG_JSON).is_file()


class ImageProcessorError(ValueError):
    """A transformers image processor config asks for preprocessing we do not implement (named, not approximated)."""


CLIP_PROCESSORS = ("CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil")
PIL_RESAMPLE = {2: "pil_bilinear", 3: "pil_bicubic"}  # PIL.Image.Resampling values


def image_processor_config(folder: Path) -> dict[str, Any] | None:
    """The image processor saved beside a transformers model: preprocessor_config.json, or the "image_processor"
    entry of processor_config.json (transformers 5 saves a processor there)."""
    import json

    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        if (folder / name).is_file():
            data = json.loads((folder / name).read_text())
            data = data.get(key) if key else data
            if data:
                return data
    return None


def processor_preprocess(data: dict[str, Any], image_size: int, source: str) -> Preprocess:
    """A CLIPImageProcessor config as our `Preprocess`: its mean/std and resample, checked against what we do
    (resize the shortest edge to the model's image size, centre-crop it, floor rounding, RGB first, /255)."""
    kind = data.get("image_processor_type", "CLIPImageProcessor")
    if kind not in CLIP_PROCESSORS:
        raise ImageProcessorError(f"{source}: image_processor_type {kind!r} is not supported; supported: "
                                  f"{CLIP_PROCESSORS}")
    size, crop = data.get("size", {"shortest_edge": image_size}), data.get("crop_size", image_size)
    crop = crop if isinstance(crop, dict) else {"height": crop, "width": crop}
    checks = {"do_resize": data.get("do_resize", True) is True, "do_center_crop": data.get("do_center_crop", True)
              is True, "do_normalize": data.get("do_normalize", True) is True,
              "do_rescale": data.get("do_rescale", True) is True,
              "rescale_factor": abs(data.get("rescale_factor", 1 / 255) - 1 / 255) < 1e-12,
              "size": size == {"shortest_edge": image_size} or size == image_size,
              "crop_size": crop == {"height": image_size, "width": image_size},
              "resample": data.get("resample", 3) in PIL_RESAMPLE}
    wrong = [name for name, ok in checks.items() if not ok]
    if wrong:
        raise ImageProcessorError(f"{source}: {', '.join(f'{k}={data.get(k)!r}' for k in wrong)} is not supported "
                                  f"(a {image_size} px model: shortest edge {image_size}, centre crop {image_size}, "
                                  "bicubic or bilinear, /255, normalised)")
    return Preprocess(mean=tuple(data.get("image_mean", CLIP_MEAN)), std=tuple(data.get("image_std", CLIP_STD)),
                      resample=PIL_RESAMPLE[data.get("resample", 3)], crop_rounding="floor")


def load_folder(cls, folder: Path, spec: Any = None, *, dtype=jnp.float32, remat: bool = False) -> nnx.Module:
    """`spec` (an OpenCLIP model config) is not used: the folder's config.json says what the model is. A
    transformers CLIPModel's preprocessing is its saved CLIPImageProcessor's (ours carry their own in config.json)."""
    data = read_config_json(folder)
    config = HybridCLIPConfig.from_dict(data)
    processor = image_processor_config(folder)
    if data.get("model_type") == "clip" and "preprocess" not in (data.get("medclip") or {}) and processor:
        config = config.replace(preprocess=processor_preprocess(processor, config.vision_config.image_size,
                                                                str(folder)))
    tensors, source = load_tensors(folder)
    return build_from_tensors(cls, config, collapse_double_prefixes(tensors), hybrid_rules(config), source=source,
                              dtype=dtype, remat=remat)


def model_tensors_hf(model: nnx.Module) -> dict[str, np.ndarray]:
    """Our parameters renamed to transformers' VisionTextDualEncoderModel / CLIPModel keys."""
    return conversion.to_hf(model_tensors(model), hybrid_rules(model.config))


def save_hybrid(model: nnx.Module, save_directory: str | os.PathLike, *, tokenizer: Any = None) -> None:
    from safetensors.numpy import save_file

    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = model_tensors_hf(model)
    model.config.to_json_file(folder / CONFIG_JSON)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
