"""Image preprocessing that travels with a model: input size comes from the vision config, the rest from here.

Every source model was trained with its own normalisation (OpenAI CLIP's mean/std, ImageNet's for timm trunks)
and resize rule; the data pipeline, the embedder, `medclip evaluate` and the app read it from the model's config
instead of assuming CLIP's, as open_clip's `preprocess_cfg` does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Self

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_MODES = ("shortest", "squash")


@dataclasses.dataclass(frozen=True)
class Preprocess:
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    # shortest: resize the shorter side, then centre-crop (CLIP); squash: resize both sides, aspect ignored
    resize_mode: str = "shortest"

    def __post_init__(self):
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 channels, got {self.mean} / {self.std}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode {self.resize_mode!r} is not supported; supported: {RESIZE_MODES}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def to_dict(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "resize_mode": self.resize_mode}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Reads ours and open_clip's `preprocess_cfg` (which also names interpolation and fill colour: the
        pipeline resizes bilinearly with antialiasing whatever they say)."""
        return cls(mean=tuple(data.get("mean", CLIP_MEAN)), std=tuple(data.get("std", CLIP_STD)),
                   resize_mode=data.get("resize_mode", "shortest"))


CLIP_PREPROCESS = Preprocess()
IMAGENET_PREPROCESS = Preprocess(mean=IMAGENET_MEAN, std=IMAGENET_STD)
