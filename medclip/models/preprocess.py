"""Input preprocessing that travels with a model: how images and texts become tensors.

Every source model was trained with its own normalisation (OpenAI CLIP's mean/std, ImageNet's for timm trunks),
resize rule, context length and padding rule (PMC-CLIP pads to 77 tokens and lets BERT attend to the padding);
the data pipeline, the embedder, `medclip evaluate` and the app read them from the model's config instead of
each picking its own, as open_clip's `preprocess_cfg` and `text_cfg.context_length` do. The image size comes from
the vision config.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Self

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_MODES = ("shortest", "squash")
# tf_bilinear: TensorFlow, fast (JPEGs decoded at a reduced DCT scale, then bilinear, antialiased on shrinks of 2x or
# more); pil_bicubic / pil_bilinear: PIL's antialiased resize of the fully decoded image, exactly what open_clip's
# and torchvision's transforms do on PIL images (slower: every pixel is decoded).
RESAMPLE_MODES = ("tf_bilinear", "pil_bicubic", "pil_bilinear")
# Where a centre crop starts when the margin is odd, on the PIL path: round (torchvision's CenterCrop: open_clip, OpenAI
# CLIP; Python's round, half to even) or floor (transformers' CLIPImageProcessor). One pixel of shift, up to 127/255.
CROP_ROUNDING = ("round", "floor")
PADDING_MODES = ("longest", "max_length")
# Caption cleaning before tokenising: none, or open_clip's tokenizers' (ftfy's fix_text, HTML entities unescaped
# twice, whitespace runs collapsed: `basic_clean` + `whitespace_clean`), which every OpenCLIP model was trained with.
CLEANING = ("none", "openclip")
DEFAULT_CONTEXT_LENGTH = 77  # CLIP's, and what every tool used before models carried their own


@dataclasses.dataclass(frozen=True)
class Preprocess:
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    # shortest: resize the shorter side, then centre-crop (CLIP); squash: resize both sides, aspect ignored
    resize_mode: str = "shortest"
    resample: str = "tf_bilinear"  # RESAMPLE_MODES
    crop_rounding: str = "round"  # CROP_ROUNDING (the PIL path)

    def __post_init__(self):
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 channels, got {self.mean} / {self.std}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode {self.resize_mode!r} is not supported; supported: {RESIZE_MODES}")
        if self.resample not in RESAMPLE_MODES:
            raise ValueError(f"resample {self.resample!r} is not supported; supported: {RESAMPLE_MODES}")
        if self.crop_rounding not in CROP_ROUNDING:
            raise ValueError(f"crop_rounding {self.crop_rounding!r} is not supported; supported: {CROP_ROUNDING}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def to_dict(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "resize_mode": self.resize_mode,
                "resample": self.resample, "crop_rounding": self.crop_rounding}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Reads ours and open_clip's `preprocess_cfg` (which names an `interpolation` and a fill colour, not our
        `resample`: the loader of an OpenCLIP folder chooses it)."""
        return cls(mean=tuple(data.get("mean", CLIP_MEAN)), std=tuple(data.get("std", CLIP_STD)),
                   resize_mode=data.get("resize_mode", "shortest"), resample=data.get("resample", "tf_bilinear"),
                   crop_rounding=data.get("crop_rounding", "round"))

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)


def pil_resample(interpolation: str) -> str:
    """Our exact `resample` for an open_clip / torchvision `interpolation` name (on PIL images)."""
    modes = {"bicubic": "pil_bicubic", "bilinear": "pil_bilinear"}
    if interpolation not in modes:
        raise ValueError(f"image interpolation {interpolation!r} is not supported; supported: {sorted(modes)}")
    return modes[interpolation]


@dataclasses.dataclass(frozen=True)
class TextPreprocess:
    """How captions become token ids: the context length, and whether padding is masked out of attention.

    `mask_padding=False` is PMC-CLIP's form: captions padded to the context length and the text encoder (and
    fusion module) attending to the [PAD] tokens, which its released weights were trained with; the features
    then depend on the padded length, so that form needs `padding="max_length"`."""

    context_length: int | None = None  # None: the text tower's limit, at most DEFAULT_CONTEXT_LENGTH
    padding: str = "longest"  # PADDING_MODES; longest: any padding works, since it is masked
    mask_padding: bool = True
    clean: str = "none"  # CLEANING

    def __post_init__(self):
        if self.context_length is not None and (isinstance(self.context_length, bool)
                                                or not isinstance(self.context_length, int)
                                                or self.context_length < 2):
            raise ValueError(f"context_length must be an integer of at least 2 (or None), not {self.context_length!r}")
        if self.padding not in PADDING_MODES:
            raise ValueError(f"padding {self.padding!r} is not supported; supported: {PADDING_MODES}")
        if self.clean not in CLEANING:
            raise ValueError(f"clean {self.clean!r} is not supported; supported: {CLEANING}")
        if not isinstance(self.mask_padding, bool):
            raise ValueError(f"mask_padding must be true or false, not {self.mask_padding!r}")
        if not self.mask_padding and self.padding != "max_length":
            raise ValueError("mask_padding=False lets the model attend to the padding, so captions must be padded "
                             "to the context length: padding must be 'max_length'")

    def length(self, positions: int) -> int:
        """The context length for a text tower that takes `positions` tokens."""
        return min(DEFAULT_CONTEXT_LENGTH, positions) if self.context_length is None else self.context_length

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Self:
        data = dict(data or {})
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"text_preprocess has unknown fields {unknown}")
        return cls(**data)


def siglip_text(context_length: int) -> TextPreprocess:
    """SigLIP's: `padding="max_length"` to the tower's positions and no attention mask, since the text tower
    pools the last position, padding or not."""
    return TextPreprocess(context_length=context_length, padding="max_length", mask_padding=False)


# PMC-CLIP's encode_text: tokenizer(padding="max_length", max_length=77) and BERT called without an attention mask
PMC_CLIP_TEXT = TextPreprocess(context_length=77, padding="max_length", mask_padding=False)


CLIP_PREPROCESS = Preprocess()
IMAGENET_PREPROCESS = Preprocess(mean=IMAGENET_MEAN, std=IMAGENET_STD)
# transformers' SiglipImageProcessor: PIL bicubic resize of the whole image to the square size (no crop), mean = std
# = 0.5
SIGLIP_PREPROCESS = Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3, resize_mode="squash", resample="pil_bicubic")


def clean_caption(text: str, mode: str) -> str:
    """A caption as the model's own tokenizer saw it in training (`TextPreprocess.clean`)."""
    if mode == "none":
        return text
    if mode != "openclip":
        raise ValueError(f"clean {mode!r} is not supported; supported: {CLEANING}")
    import html
    import re

    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()
