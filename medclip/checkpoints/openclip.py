"""OpenCLIP's format: `open_clip_config.json` (`model_cfg` + `preprocess_cfg`) with `open_clip_model.safetensors`
or `open_clip_pytorch_model.bin`, or a bare state dict (a training checkpoint, DDP's `module.` prefix) named
with a model config.

Most medical CLIPs ship this way (BiomedCLIP: a timm ViT trunk + a Hugging Face BERT with an MLP head). The
model config is translated into our towers and heads; an option we do not implement is refused by name rather
than loaded approximately. The original `model_cfg` is kept in our config, so `save_open_clip` writes it back.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from medclip.checkpoints import conversion
from medclip.checkpoints.assembly import build_from_tensors, head_rules, model_tensors, tower_rules
from medclip.checkpoints.hf_config import CONFIG_JSON, read_json
from medclip.checkpoints.openclip_config import (  # noqa: F401 (re-exported: the format's public names)
    OpenCLIPConfigError, builtin_model_names, model_config, resolve_hf_text_config, text_tokenizer_name)
from medclip.checkpoints.readers import CheckpointError
from medclip.models import modified_resnet, registry
from medclip.models.bert import BertConfig
from medclip.models.clip_text import CLIPTextConfig
from medclip.models.clip_vision import CLIPVisionConfig
from medclip.models.heads import HeadConfig
from medclip.models.hybrid import HybridCLIPConfig
from medclip.models.preprocess import Preprocess, TextPreprocess, pil_resample
from medclip.models.weights import Rule

OPEN_CLIP_CONFIG = "open_clip_config.json"
WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


# -- model_cfg -> our config ---------------------------------------------------------------------------------

def _refuse(cfg: dict[str, Any], where: str, defaults: dict[str, Any]) -> None:
    """Options our towers do not implement must have their default value; otherwise say which."""
    bad = {k: cfg[k] for k, default in defaults.items() if k in cfg and cfg[k] not in (default, None)}
    if bad:
        raise OpenCLIPConfigError(f"{where}: OpenCLIP options {bad} are not supported (only their defaults "
                                  f"{ {k: defaults[k] for k in bad} })")


def _vision_config(cfg: dict[str, Any], embed_dim: int, quick_gelu: bool) -> tuple[Any, HeadConfig]:
    image_size = cfg.get("image_size", 224)
    if isinstance(image_size, (list, tuple)):
        if len(set(image_size)) != 1:
            raise OpenCLIPConfigError(f"vision_cfg.image_size {image_size}: only square images are supported")
        image_size = image_size[0]
    if cfg.get("timm_model_name"):
        _refuse(cfg, "vision_cfg", {"timm_drop": 0.0, "timm_drop_path": None})
        kwargs = dict(cfg.get("timm_model_kwargs") or {})
        kwargs.setdefault("img_size", image_size)
        try:
            vision = registry.vision_config_from_timm(cfg["timm_model_name"], **kwargs)
        except ValueError as e:
            raise OpenCLIPConfigError(f"vision_cfg.timm_model_name: {e}") from None
        # "" keeps the trunk's own pooling (a ViT's class token, a convnet's average), "avg" averages the
        # feature map (or a ViT's tokens, which we do not build); open_clip's default is "avg"
        pools, pool = vision.timm_pools, cfg.get("timm_pool", "avg")
        if pool not in pools:
            raise OpenCLIPConfigError(f"vision_cfg: OpenCLIP option timm_pool {pool!r} (open_clip's default when "
                                      f"absent: 'avg') is not supported for {cfg['timm_model_name']} (only {pools})")
        proj = cfg.get("timm_proj", "linear")
        bias = bool(cfg.get("timm_proj_bias", False))
        if proj == "linear":
            head = HeadConfig(type="linear", bias=bias)
        elif proj == "mlp":  # timm Mlp(width, 2 * embed_dim, embed_dim, bias=(True, proj_bias))
            head = HeadConfig(type="mlp", bias=bias, hidden_size=2 * embed_dim, hidden_bias=True)
        else:
            raise OpenCLIPConfigError(f"vision_cfg.timm_proj {proj!r} is not supported (linear, mlp)")
        return vision, head
    layers = cfg.get("layers", 12)
    if isinstance(layers, (list, tuple)):  # OpenAI's ModifiedResNet (RN50...): attention pooling projects already
        _refuse(cfg, "vision_cfg", {"freeze_bn_stats": False})
        return modified_resnet.config_from_open_clip(cfg, embed_dim), HeadConfig(type="none")
    _refuse(cfg, "vision_cfg", {"ls_init_value": None, "attentional_pool": False, "no_ln_pre": False,
                                "pool_type": "tok", "final_ln_after_pool": False, "output_tokens": False,
                                "act_kwargs": None, "norm_kwargs": None, "patch_dropout": 0.0})
    width = cfg.get("width", 768)
    vision = CLIPVisionConfig(hidden_size=width, intermediate_size=int(width * cfg.get("mlp_ratio", 4.0)),
                              num_hidden_layers=layers, num_attention_heads=width // cfg.get("head_width", 64),
                              image_size=image_size, patch_size=cfg.get("patch_size", 16),
                              hidden_act="quick_gelu" if quick_gelu else "gelu", layer_norm_eps=1e-5)
    return vision, HeadConfig()


_HF_POOLERS = {"mean_pooler": "mean", "cls_pooler": "pooler_output", "cls_last_hidden_state_pooler": "cls"}


def _text_config(cfg: dict[str, Any], embed_dim: int, quick_gelu: bool, tensors: dict[str, np.ndarray] | None,
                 source: str) -> tuple[Any, HeadConfig]:
    if cfg.get("hf_model_name"):
        text = resolve_hf_text_config(cfg["hf_model_name"], tensors, source)
        # Newer open_clip writes hf_proj_type / hf_pooler_type, older files proj / pooler_type.
        proj = cfg.get("hf_proj_type", cfg.get("proj", "mlp"))
        pooler_name = cfg.get("hf_pooler_type", cfg.get("pooler_type", "mean_pooler"))
        if pooler_name not in _HF_POOLERS:
            raise OpenCLIPConfigError(f"text_cfg pooler {pooler_name!r} is not supported; supported: {sorted(_HF_POOLERS)}")
        pooler = _HF_POOLERS[pooler_name]
        if isinstance(text, BertConfig) and not text.is_distilbert:
            # open_clip builds the HF model with its pooling layer only for the pooler that reads it
            text = text.replace(add_pooling_layer=pooler == "pooler_output")
        if pooler == "pooler_output" and not text.has_pooler:
            pooler = "cls"  # open_clip's ClsPooler falls back to the [CLS] state without a pooler
        bias = bool(cfg.get("proj_bias", False))
        if proj == "mlp":  # open_clip: Linear(d, (d + embed) // 2, bias) -> GELU -> Linear(.., embed, bias)
            head = HeadConfig(type="mlp", bias=bias, hidden_size=(text.hidden_size + embed_dim) // 2,
                              hidden_bias=bias, pooler=pooler)
        elif proj == "linear":
            head = HeadConfig(type="linear", bias=bias, pooler=pooler)
        elif proj in (None, "none") and text.hidden_size == embed_dim:
            head = HeadConfig(type="none", pooler=pooler)
        else:
            raise OpenCLIPConfigError(f"text_cfg projection {proj!r} is not supported (mlp, linear)")
        return text, head
    _refuse(cfg, "text_cfg", {"ls_init_value": None, "embed_cls": False, "no_causal_mask": False,
                              "final_ln_after_pool": False, "pool_type": "argmax", "output_tokens": False,
                              "act_kwargs": None, "norm_kwargs": None, "proj_type": "linear"})
    width, vocab = cfg.get("width", 512), cfg.get("vocab_size", 49408)
    text = CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=int(width * cfg.get("mlp_ratio", 4.0)),
                          num_hidden_layers=cfg.get("layers", 12), num_attention_heads=cfg.get("heads", 8),
                          max_position_embeddings=cfg.get("context_length", 77),
                          hidden_act="quick_gelu" if quick_gelu else "gelu", layer_norm_eps=1e-5,
                          pad_token_id=cfg.get("pad_id", 0), bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                          pool_type="argmax")
    return text, HeadConfig(bias=bool(cfg.get("proj_bias", False)))


def config_from_open_clip(model_cfg: dict[str, Any], preprocess_cfg: dict[str, Any] | None = None, *,
                          tensors: dict[str, np.ndarray] | None = None, source: str = "") -> HybridCLIPConfig:
    """Our config for an OpenCLIP `model_cfg`; `tensors` (the state dict) lets an HF text tower's config be
    inferred from its weights when its config cannot be found."""
    where = source or "open_clip model config"
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in model_cfg:
            raise OpenCLIPConfigError(f"{where}: model_cfg lacks {key!r}")
    if model_cfg["vision_cfg"].get("timm_pool") == "map" or model_cfg["text_cfg"].get("pool_type") == "last":
        raise OpenCLIPConfigError(f"{where}: an OpenCLIP SigLIP model (timm trunk with attention pooling, text pooled "
                                  "at the last token) is not supported in OpenCLIP's layout; load its transformers "
                                  "SiglipModel release (config.json with model_type siglip) instead")
    embed_dim, quick_gelu = model_cfg["embed_dim"], bool(model_cfg.get("quick_gelu", False))
    vision, vision_head = _vision_config(model_cfg["vision_cfg"], embed_dim, quick_gelu)
    text, text_head = _text_config(model_cfg["text_cfg"], embed_dim, quick_gelu, tensors, where)
    init_bias = model_cfg.get("init_logit_bias")
    if init_bias is None and tensors is not None and "logit_bias" in tensors:
        init_bias = float(np.asarray(tensors["logit_bias"]))
    preprocess = Preprocess.from_dict(preprocess_cfg) if preprocess_cfg else None
    return open_clip_inputs(HybridCLIPConfig(vision_config=vision, text_config=text, projection_dim=embed_dim,
                            logit_scale_init_value=float(np.log(1 / 0.07)),
                            logit_bias_init_value=None if init_bias is None else float(init_bias),
                            vision_head=vision_head, text_head=text_head, preprocess=preprocess,
                            open_clip_model_cfg=copy.deepcopy(model_cfg)), model_cfg, preprocess_cfg)


def open_clip_inputs(config: HybridCLIPConfig, model_cfg: dict[str, Any],
                     preprocess_cfg: dict[str, Any] | None) -> HybridCLIPConfig:
    """open_clip's own inputs: its tokenizer's `text_cfg.context_length` (77 unless given; BiomedCLIP's 256) and
    its transforms' PIL resize (`interpolation`, bicubic unless given)."""
    try:
        resample = pil_resample((preprocess_cfg or {}).get("interpolation", "bicubic"))
    except ValueError as error:
        raise OpenCLIPConfigError(f"preprocess_cfg: {error}") from None
    return config.replace(preprocess=config.preprocess.replace(resample=resample),
                          text_preprocess=TextPreprocess(context_length=model_cfg["text_cfg"].get("context_length", 77),
                                                         clean="openclip"))


# -- the state dict's layout ---------------------------------------------------------------------------------

def _head_rules(ckpt: str, ours: str, head: HeadConfig, *, raw: bool) -> list[Rule]:
    """OpenCLIP heads: the HF text head's MLP is an nn.Sequential (0 / 2), the vision head's timm's Mlp."""
    return head_rules(ckpt, ours, head, raw=raw, mlp_names=("0", "2") if ckpt.startswith("text.") else ("fc1", "fc2"))


def openclip_rules(config: HybridCLIPConfig) -> list[Rule]:
    vision, text = config.vision_config, config.text_config
    if "timm" in registry.tower_for_config(vision).formats():  # open_clip's TimmModel: any timm trunk
        rules = [*conversion.prefixed("visual.trunk.", tower_rules(vision, "timm"), "vision_model."),
                 *_head_rules("visual.head.mlp" if config.vision_head.type == "mlp" else "visual.head.proj",
                              "visual_projection", config.vision_head, raw=False)]
    elif isinstance(vision, modified_resnet.ModifiedResNetConfig):
        rules = conversion.prefixed("visual.", tower_rules(vision, "openclip"), "vision_model.")
    elif type(vision) is CLIPVisionConfig:
        rules = [*conversion.prefixed("visual.", tower_rules(vision, "openclip"), "vision_model."),
                 *_head_rules("visual.proj", "visual_projection", config.vision_head, raw=True)]
    else:
        raise OpenCLIPConfigError(f"no OpenCLIP layout for a {type(vision).__name__} vision tower")
    if isinstance(text, BertConfig):
        rules += [*conversion.prefixed("text.transformer.", tower_rules(text, "openclip"), "text_model."),
                  *_head_rules("text.proj", "text_projection", config.text_head, raw=False)]
    elif isinstance(text, CLIPTextConfig):
        prefix = "text." if (config.open_clip_model_cfg or {}).get("custom_text") else ""
        rules += [*conversion.prefixed(prefix, tower_rules(text, "openclip"), "text_model."),
                  *_head_rules(f"{prefix}text_projection", "text_projection", config.text_head, raw=True)]
    else:
        raise OpenCLIPConfigError(f"no OpenCLIP layout for a {type(text).__name__} text tower")
    return [*rules, Rule("logit_scale", "logit_scale"), Rule("logit_bias", "logit_bias")]


# Buffers and heads an OpenCLIP state dict carries that our model does not use.
_IGNORED = re.compile(r"(^|\.)attn_mask$|(^|\.)position_ids$")


def is_folder(folder: Path) -> bool:
    """An OpenCLIP hub folder: open_clip_config.json and no transformers config.json beside it."""
    return (folder / OPEN_CLIP_CONFIG).is_file() and not (folder / CONFIG_JSON).is_file()


def read_folder(folder: Path) -> tuple[Path, dict[str, Any], dict[str, Any] | None]:
    """An OpenCLIP hub folder's weights file, model_cfg and preprocess_cfg; the weights themselves are a state
    dict the format dispatcher reads (it may be another format's: PMC-CLIP's)."""
    data = read_json(folder / OPEN_CLIP_CONFIG)
    if "model_cfg" not in data:
        raise OpenCLIPConfigError(f"{folder / OPEN_CLIP_CONFIG} has no model_cfg")
    weights = next((folder / n for n in WEIGHT_NAMES if (folder / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{folder}: OpenCLIP folder without weights; looked for {', '.join(WEIGHT_NAMES)}")
    return weights, data["model_cfg"], data.get("preprocess_cfg")


def load_state_dict(cls, tensors: dict[str, np.ndarray], spec: str | os.PathLike | dict | None, source: str, *,
                    dtype=jnp.float32, remat: bool = False, preprocess_cfg: dict | None = None) -> nnx.Module:
    """An OpenCLIP state dict (already unwrapped from a training checkpoint) with the model config `spec` names."""
    if spec is None:
        raise CheckpointError(f"{source} is a bare weights file: say which model it holds with an OpenCLIP model "
                              f"config (open_clip_model= one of {builtin_model_names()} or a JSON file), or pass "
                              "the model folder")
    model_cfg = model_config(spec)
    config = config_from_open_clip(model_cfg, preprocess_cfg, tensors=tensors, source=source)
    return build_from_tensors(cls, config, tensors, openclip_rules(config), source=source, dtype=dtype,
                              remat=remat, ignored=_IGNORED)


# -- export --------------------------------------------------------------------------------------------------

def open_clip_model_cfg(config: HybridCLIPConfig) -> dict[str, Any]:
    """The model's OpenCLIP config: its own when it came from OpenCLIP, else written from our towers."""
    if config.open_clip_model_cfg is not None:
        return copy.deepcopy(config.open_clip_model_cfg)
    vision, text = config.vision_config, config.text_config
    if type(vision) is not CLIPVisionConfig or type(text) is not CLIPTextConfig:
        raise OpenCLIPConfigError("OpenCLIP export is supported for OpenCLIP-origin models and for CLIP ViT + CLIP "
                                  f"text models, not {type(vision).__name__} + {type(text).__name__}")
    acts = {vision.hidden_act, text.hidden_act}
    if len(acts) != 1 or not acts <= {"quick_gelu", "gelu"}:
        raise OpenCLIPConfigError(f"OpenCLIP uses one activation for both towers (gelu or quick_gelu), not {acts}")
    if text.eos_token_id != text.vocab_size - 1:
        raise OpenCLIPConfigError("OpenCLIP pools text at the highest token id: the end-of-text token must be the "
                                  f"last of the vocabulary (eos_token_id {text.eos_token_id}, vocab {text.vocab_size})")
    cfg = {"embed_dim": config.projection_dim,
           "vision_cfg": {"image_size": vision.image_size, "layers": vision.num_hidden_layers,
                          "width": vision.hidden_size, "patch_size": vision.patch_size,
                          "head_width": vision.hidden_size // vision.num_attention_heads,
                          "mlp_ratio": vision.intermediate_size / vision.hidden_size},
           "text_cfg": {"context_length": text.max_position_embeddings, "vocab_size": text.vocab_size,
                        "width": text.hidden_size, "heads": text.num_attention_heads,
                        "layers": text.num_hidden_layers, "mlp_ratio": text.intermediate_size / text.hidden_size}}
    if "quick_gelu" in acts:
        cfg["quick_gelu"] = True
    return cfg


def save_open_clip(model: nnx.Module, save_directory: str | os.PathLike) -> Path:
    """Writes open_clip_config.json + open_clip_model.safetensors, as open_clip's hub upload lays them out, so
    `open_clip.create_model_and_transforms("hf-hub:...")` (or local_dir) loads the model."""
    from safetensors.numpy import save_file

    config = model.config
    if config.text_inputs != 1 or config.fusion is not None:
        raise ValueError("OpenCLIP's layout has no second text input and no fusion module: save this model with "
                         "save_pretrained")
    model_cfg = open_clip_model_cfg(config)
    preprocess = config.image_preprocess
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = conversion.to_hf(model_tensors(model), openclip_rules(config.replace(open_clip_model_cfg=model_cfg)))
    payload = {"model_cfg": model_cfg,
               "preprocess_cfg": {"mean": list(preprocess.mean), "std": list(preprocess.std),
                                  "resize_mode": preprocess.resize_mode}}
    (folder / OPEN_CLIP_CONFIG).write_text(json.dumps(payload, indent=2) + "\n")
    save_file(tensors, str(folder / "open_clip_model.safetensors"))
    return folder
