"""timm's VisionTransformer as a vision tower (BiomedCLIP's trunk: `vit_base_patch16_224`).

The same transformer as CLIP's ViT (medclip.models.clip_vision) with timm's choices: a biased patch projection,
no layer norm before the encoder, exact GELU, norm epsilon 1e-6. timm builds a ViT from its architecture name,
so the sizes come from the name (`vit_{size}_patch{p}_{image}`) unless a config gives them.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar, Self

from medclip.models.clip_vision import TIMM_RULES, CLIPVisionConfig, VisionTransformer
from medclip.models.preprocess import Preprocess
from medclip.models.registry import register
from medclip.models.tower_contract import TowerSpec, UnknownArchitectureError, UnsupportedOptionError
from medclip.models.weights import Rule

# timm's ViT sizes: width, depth, heads (mlp ratio 4 for all of these)
_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16),
          "huge": (1280, 32, 16)}
_NAME = re.compile(r"^vit_(?P<size>tiny|small|base|large|huge)_patch(?P<patch>\d+)_(?P<image>\d+)$")
# timm.create_model keyword -> our field, for configs that resize a named architecture
_KWARGS = {"embed_dim": "hidden_size", "depth": "num_hidden_layers", "num_heads": "num_attention_heads",
           "patch_size": "patch_size", "img_size": "image_size"}
INCEPTION_PREPROCESS = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # timm's ViT default


@dataclasses.dataclass(frozen=True)
class TimmViTConfig(CLIPVisionConfig):
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    timm_model_name: str = "vit_base_patch16_224"

    model_type: ClassVar[str] = "timm_vit"
    patch_bias: ClassVar[bool] = True
    pre_layernorm: ClassVar[bool] = False
    default_preprocess: ClassVar[Preprocess] = INCEPTION_PREPROCESS
    timm_architectures: ClassVar[tuple[str, ...]] = (
        f"vit_{{{'|'.join(_SIZES)}}}_patch{{N}}_{{image size}} (e.g. vit_base_patch16_224)",)

    @classmethod
    def from_timm_name(cls, name: str, **timm_kwargs: Any) -> Self:
        """The config of `timm.create_model(name, **timm_kwargs)`; only the size-changing kwargs are known."""
        m = _NAME.match(name)
        if m is None:
            raise UnknownArchitectureError(
                f"timm architecture {name!r} is not supported as a vision tower; supported: "
                f"vit_{{{'|'.join(_SIZES)}}}_patch{{N}}_{{image size}} (e.g. vit_base_patch16_224)")
        unknown = sorted(set(timm_kwargs) - set(_KWARGS) - {"mlp_ratio"})
        if unknown:
            raise UnsupportedOptionError(f"timm kwargs {unknown} for {name} are not supported; "
                                           f"supported: {sorted(_KWARGS) + ['mlp_ratio']}")
        width, depth, heads = _SIZES[m["size"]]
        fields = dict(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                      patch_size=int(m["patch"]), image_size=int(m["image"]))
        fields.update({_KWARGS[k]: v for k, v in timm_kwargs.items() if k in _KWARGS})
        fields["intermediate_size"] = int(fields["hidden_size"] * timm_kwargs.get("mlp_ratio", 4.0))
        return cls(timm_model_name=name, **fields)

    @classmethod
    def tiny(cls) -> Self:
        return cls.from_timm_name("vit_base_patch16_224", embed_dim=32, depth=2, num_heads=4, patch_size=8,
                                  img_size=32)


def conversion_rules(config: TimmViTConfig, fmt: str) -> list[Rule]:
    del config
    return {"timm": TIMM_RULES}[fmt]


register(TowerSpec("timm_vit", "vision", TimmViTConfig, VisionTransformer, conversion_rules,
                   prefixes={"timm": ("visual.trunk.", "trunk.", "")}, model_types=("timm_vit",),
                   preprocess=INCEPTION_PREPROCESS))
