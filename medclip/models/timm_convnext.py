"""timm's ConvNeXt as a vision tower: the `convnext_*` family (atto ... xxlarge), OpenCLIP's ConvNeXt trunks.

A 4x4 stride-4 "patch" stem convolution + LayerNorm, four stages of ConvNeXt blocks (a depthwise 7x7
convolution, a channels-last LayerNorm, an MLP with exact GELU, a layer scale `gamma`, drop path on the residual
branch) with a LayerNorm + 2x2 stride-2 convolution between stages, then timm's head without its classifier
(`forward_head(pre_logits=True)`, what open_clip's TimmModel keeps): a global average pool and a LayerNorm,
pooled (batch, dims[-1]). In NHWC every LayerNorm is timm's channels-last one, LayerNorm2d included. The small
models (atto ... nano, timm's `conv_mlp=True`) hold their MLP as 1x1 convolutions, the others as linears: the
same function, stored in two shapes. Drop path rates grow linearly over the blocks from 0 to `drop_path_rate`,
as timm's; a tower with drop path > 0 is `stochastic`, so image-feature caches refuse it. Parameter names mirror
timm's; a checkpoint's `head.fc.*` (the classifier) is skipped.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Self

import jax
import jax.numpy as jnp
from flax import nnx

from medclip.models import kernels
from medclip.models.config_base import VisionTowerConfig
from medclip.models.conv import Conv2d, global_avg_pool
from medclip.models.layers import MLP, drop_path, split_rng
from medclip.models.preprocess import IMAGENET_PREPROCESS, Preprocess
from medclip.models.registry import register
from medclip.models.timm_options import timm_config_fields
from medclip.models.tower_contract import TowerSpec
from medclip.models.weights import Rule, conv2d, linear, norm

# timm name -> create_model defaults (depths, dims, and what differs from ConvNeXt's own defaults)
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "convnext_atto": {"depths": (2, 2, 6, 2), "dims": (40, 80, 160, 320), "conv_mlp": True},
    "convnext_femto": {"depths": (2, 2, 6, 2), "dims": (48, 96, 192, 384), "conv_mlp": True},
    "convnext_pico": {"depths": (2, 2, 6, 2), "dims": (64, 128, 256, 512), "conv_mlp": True},
    "convnext_nano": {"depths": (2, 2, 8, 2), "dims": (80, 160, 320, 640), "conv_mlp": True},
    "convnext_tiny": {"depths": (3, 3, 9, 3), "dims": (96, 192, 384, 768)},
    "convnext_small": {"depths": (3, 3, 27, 3), "dims": (96, 192, 384, 768)},
    "convnext_base": {"depths": (3, 3, 27, 3), "dims": (128, 256, 512, 1024)},
    "convnext_large": {"depths": (3, 3, 27, 3), "dims": (192, 384, 768, 1536)},
    "convnext_xlarge": {"depths": (3, 3, 27, 3), "dims": (256, 512, 1024, 2048)},
    "convnext_xxlarge": {"depths": (3, 4, 30, 3), "dims": (384, 768, 1536, 3072), "norm_eps": 1e-5},
}
MLP_RATIO = 4  # timm's ConvNeXt does not expose it
# timm.create_model / ConvNeXt(...) keywords: ours, or accepted because the tower does not depend on them
_KWARGS = {"depths": "depths", "dims": "dims", "kernel_sizes": "kernel_sizes", "patch_size": "patch_size",
           "ls_init_value": "ls_init_value", "conv_mlp": "conv_mlp", "norm_eps": "norm_eps",
           "drop_path_rate": "drop_path_rate", "in_chans": "num_channels", "img_size": "image_size"}
_NO_EFFECT = {"num_classes", "head_init_scale"}  # the classifier (not built) and its initialisation
# keywords that change the trunk: only these values are built (the first is timm's default). drop_rate acts
# between the pooled features and the classifier, so it would reach our pooled output in training: refused.
_DEFAULTS = {"global_pool": ("avg",), "output_stride": (32,), "stem_type": ("patch",), "head_norm_first": (False,),
             "head_hidden_size": (None,), "use_grn": (False,), "act_layer": ("gelu",),
             "norm_layer": (None, "layernorm", "layernorm2d"), "conv_bias": (True,), "drop_rate": (0.0,)}


@dataclasses.dataclass(frozen=True)
class TimmConvNeXtConfig(VisionTowerConfig):
    depths: tuple[int, ...] = (3, 3, 9, 3)  # blocks per stage
    dims: tuple[int, ...] = (96, 192, 384, 768)  # channels per stage
    kernel_sizes: tuple[int, ...] = (7, 7, 7, 7)  # depthwise kernel per stage (timm takes an int or one per stage)
    patch_size: int = 4  # the stem's kernel and stride
    # layer scale's initial value; None: no layer scale (no `gamma`): timm's ConvNeXt(ls_init_value=None), which
    # create_model cannot ask for (it drops None keywords)
    ls_init_value: float | None = 1e-6
    conv_mlp: bool = False  # the MLP stored as 1x1 convolutions (timm's small models)
    norm_eps: float = 1e-6
    drop_path_rate: float = 0.0  # stochastic depth of the last block; 0 at the first, linear in between
    num_channels: int = 3
    image_size: int = 224  # what the pipeline resizes to; the tower takes any multiple of 32
    timm_model_name: str = "convnext_tiny"

    model_type: ClassVar[str] = "timm_convnext"
    default_preprocess: ClassVar[Preprocess] = IMAGENET_PREPROCESS
    timm_architectures: ClassVar[tuple[str, ...]] = tuple(ARCHITECTURES)
    timm_pools: ClassVar[tuple[str, ...]] = ("", "avg")  # both: timm's head averages, then normalises

    @property
    def stochastic(self) -> bool:
        return self.drop_path_rate > 0

    def __post_init__(self):
        kernels = self.kernel_sizes
        kernels = (kernels,) * len(self.depths) if isinstance(kernels, int) else tuple(kernels)
        object.__setattr__(self, "depths", tuple(self.depths))
        object.__setattr__(self, "dims", tuple(self.dims))
        object.__setattr__(self, "kernel_sizes", kernels)
        if not len(self.depths) == len(self.dims) == len(self.kernel_sizes):
            raise ValueError(f"depths {self.depths}, dims {self.dims} and kernel_sizes {self.kernel_sizes} need "
                             "one entry per stage")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate {self.drop_path_rate} must be in [0, 1)")

    @property
    def hidden_size(self) -> int:
        """The pooled features' width."""
        return self.dims[-1]

    def drop_path_rates(self) -> list[list[float]]:
        """Per stage, per block: timm's `linspace(0, drop_path_rate, sum(depths))` split by stage."""
        total = sum(self.depths)
        flat = [self.drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
        starts = [sum(self.depths[:s]) for s in range(len(self.depths))]
        return [flat[start:start + depth] for start, depth in zip(starts, self.depths)]

    @classmethod
    def from_timm_name(cls, name: str, **timm_kwargs: Any) -> Self:
        """The config of `timm.create_model(name, **timm_kwargs)` (its trunk: the classifier is not built)."""
        fields = timm_config_fields(name, "ConvNeXt", ARCHITECTURES, timm_kwargs, _KWARGS, _NO_EFFECT, _DEFAULTS)
        return cls(**{**ARCHITECTURES[name], "timm_model_name": name, **fields})

    @classmethod
    def tiny(cls) -> Self:
        """The golden fixture's shape (tests/golden/timm_convnext_tiny): narrow, 1-2 blocks per stage."""
        return cls.from_timm_name("convnext_tiny", depths=(1, 2, 1, 1), dims=(8, 16, 24, 32), img_size=64)


class ConvMLP(nnx.Module):
    """timm's Mlp(use_conv=True): 1x1 convolutions `fc1` -> GELU -> `fc2`, the same function as layers.MLP."""

    def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs):
        self.fc1 = Conv2d(dim, hidden, 1, bias=True, dtype=dtype, rngs=rngs)
        self.fc2 = Conv2d(hidden, dim, 1, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(kernels.gelu(self.fc1(x)))


class Block(nnx.Module):
    """x + drop_path(gamma * mlp(norm(conv_dw(x)))), as timm's ConvNeXtBlock (stride 1, no dilation)."""

    def __init__(self, dim: int, kernel: int, rate: float, config: TimmConvNeXtConfig, *, dtype, rngs: nnx.Rngs):
        self.conv_dw = Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim, bias=True, dtype=dtype, rngs=rngs)
        self.norm = nnx.LayerNorm(dim, epsilon=config.norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = (ConvMLP(dim, MLP_RATIO * dim, dtype=dtype, rngs=rngs) if config.conv_mlp
                    else MLP(dim, MLP_RATIO * dim, "gelu", dtype=dtype, rngs=rngs))
        ls = config.ls_init_value
        self.gamma = nnx.Param(jnp.full((dim,), ls, jnp.float32)) if ls is not None else None
        self.rate = rate

    def __call__(self, x: jax.Array, rng: jax.Array | None) -> jax.Array:
        y = self.mlp(self.norm(self.conv_dw(x)))
        if self.gamma is not None:
            y = y * self.gamma[...].astype(y.dtype)
        return x + drop_path(y, self.rate, rng)


class Stage(nnx.Module):
    """timm's ConvNeXtStage: `downsample` (LayerNorm + 2x2 stride-2 conv) where the stage narrows, then blocks."""

    def __init__(self, in_dim: int, stage: int, config: TimmConvNeXtConfig, *, dtype, rngs: nnx.Rngs):
        dim = config.dims[stage]
        if stage > 0:
            self.downsample_norm = nnx.LayerNorm(in_dim, epsilon=config.norm_eps, dtype=dtype, rngs=rngs)
            self.downsample_conv = Conv2d(in_dim, dim, 2, stride=2, bias=True, dtype=dtype, rngs=rngs)
        else:  # the stem is the first stage's width already
            self.downsample_norm = self.downsample_conv = None
        self.blocks = nnx.List([Block(dim, config.kernel_sizes[stage], rate, config, dtype=dtype, rngs=rngs)
                                for rate in config.drop_path_rates()[stage]])


class TimmConvNeXt(nnx.Module):
    """Returns (final feature map (batch, h, w, dims[-1]) or None, pooled (batch, dims[-1]): average, then norm)."""

    def __init__(self, config: TimmConvNeXtConfig, *, dtype=jnp.float32, remat: bool = False, rngs: nnx.Rngs):
        self.config, self.remat = config, remat
        p = config.patch_size
        self.stem_conv = Conv2d(config.num_channels, config.dims[0], p, stride=p, bias=True, dtype=dtype, rngs=rngs)
        self.stem_norm = nnx.LayerNorm(config.dims[0], epsilon=config.norm_eps, dtype=dtype, rngs=rngs)
        widths = (config.dims[0], *config.dims[:-1])
        self.stages = nnx.List([Stage(widths[s], s, config, dtype=dtype, rngs=rngs) for s in range(len(config.dims))])
        # the pooled features in fp32 whatever the compute dtype, as the other convolutional towers'
        self.head_norm = nnx.LayerNorm(config.hidden_size, epsilon=config.norm_eps, dtype=jnp.float32, rngs=rngs)

    def __call__(self, pixel_values: jax.Array, *, dropout_rng: jax.Array | None = None,
                 pooled_only: bool = False, train: bool = False):
        """pixel_values NHWC; `dropout_rng` drives drop path (None: none); `train` changes nothing (no BatchNorm)."""
        del train
        rngs = iter(split_rng(dropout_rng, sum(self.config.depths)))
        x = self.stem_norm(self.stem_conv(pixel_values))
        for stage in self.stages:
            if stage.downsample_conv is not None:
                x = stage.downsample_conv(stage.downsample_norm(x))
            for block in stage.blocks:
                rng = next(rngs)
                x = nnx.remat(lambda module, h, r: module(h, r))(block, x, rng) if self.remat else block(x, rng)
        pooled = self.head_norm(global_avg_pool(x.astype(jnp.float32)))
        return (None if pooled_only else x), pooled


def _stage_rules(config: TimmConvNeXtConfig, stage: int) -> list[Rule]:
    s, b = f"stages.{stage}", f"stages.{stage}.blocks.{{i}}"
    mlp = (lambda name: conv2d(f"{b}.mlp.{name}", f"{b}.mlp.{name}", bias=True)) if config.conv_mlp else \
        (lambda name: linear(f"{b}.mlp.{name}", f"{b}.mlp.{name}"))
    rules = [*conv2d(f"{b}.conv_dw", f"{b}.conv_dw", bias=True), *norm(f"{b}.norm", f"{b}.norm"),
             *mlp("fc1"), *mlp("fc2")]
    if config.ls_init_value is not None:
        rules.append(Rule(f"{b}.gamma", f"{b}.gamma"))
    if stage > 0:
        rules += [*norm(f"{s}.downsample.0", f"{s}.downsample_norm"),
                  *conv2d(f"{s}.downsample.1", f"{s}.downsample_conv", bias=True)]
    return rules


def timm_rules(config: TimmConvNeXtConfig) -> list[Rule]:
    """timm ConvNeXt state dict keys (without the classifier `head.fc.*`)."""
    return [*conv2d("stem.0", "stem_conv", bias=True), *norm("stem.1", "stem_norm"),
            *[r for stage in range(len(config.depths)) for r in _stage_rules(config, stage)],
            *norm("head.norm", "head_norm")]


def conversion_rules(config: TimmConvNeXtConfig, fmt: str) -> list[Rule]:
    return {"timm": timm_rules(config)}[fmt]


register(TowerSpec("timm_convnext", "vision", TimmConvNeXtConfig, TimmConvNeXt, conversion_rules,
                   prefixes={"timm": ("visual.trunk.", "trunk.", "")}, model_types=("timm_convnext",),
                   preprocess=TimmConvNeXtConfig.default_preprocess, ignored_keys=r"^head\.fc\."))
