"""timm's (and torchvision's) ResNet as a vision tower: ResNet-50 (Bottleneck) and ResNet-18/34 (BasicBlock).

A 7x7 stride-2 stem with BatchNorm, ReLU and a 3x3 max pool, four stages of residual blocks (the stride on the
3x3 convolution, "v1.5"), a 1x1 convolution + BatchNorm `downsample` where the shape changes, then a global
average pool: pooled (batch, channels[-1] * expansion), 2048 for ResNet-50. No classifier (timm's
`num_classes=0`, as open_clip's TimmModel builds its trunk); a checkpoint's `fc.*` is skipped. Parameter names
mirror timm's, so the conversion table is a renaming of `.weight` to `.kernel` / `.scale`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Self

import jax
import jax.numpy as jnp
from flax import nnx

from medclip.models.config_base import VisionTowerConfig
from medclip.models.conv import BatchNorm, Conv2d, global_avg_pool, max_pool
from medclip.models.preprocess import IMAGENET_PREPROCESS, Preprocess
from medclip.models.registry import register
from medclip.models.timm_options import TIMM_CLASSIFIER, timm_config_fields
from medclip.models.tower_contract import TowerSpec
from medclip.models.weights import Rule, batch_norm, conv2d

# timm name -> (block, layers); channels default to (64, 128, 256, 512)
ARCHITECTURES = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
                 "resnet50": ("bottleneck", (3, 4, 6, 3)), "resnet101": ("bottleneck", (3, 4, 23, 3)),
                 "resnet152": ("bottleneck", (3, 8, 36, 3))}
EXPANSION = {"basic": 1, "bottleneck": 4}
# timm.create_model / ResNet(...) keywords: ours, or accepted because the tower does not depend on them
_KWARGS = {"layers": "layers", "channels": "channels", "cardinality": "cardinality", "base_width": "base_width",
           "in_chans": "num_channels", "img_size": "image_size"}
_NO_EFFECT = {"num_classes", "drop_rate", "zero_init_last"}  # the classifier (not built) and initialisation
# keywords that change the trunk: only these values are built (the first is timm's default)
_DEFAULTS = {"global_pool": ("avg", ""), "drop_path_rate": (0.0, None), "output_stride": (32, None),
             "stem_type": ("", None), "avg_down": (False, None)}


@dataclasses.dataclass(frozen=True)
class TimmResNetConfig(VisionTowerConfig):
    layers: tuple[int, ...] = (3, 4, 6, 3)  # blocks per stage
    channels: tuple[int, ...] = (64, 128, 256, 512)  # `planes` per stage (outputs are planes * expansion)
    block: str = "bottleneck"  # bottleneck | basic
    cardinality: int = 1  # groups of the 3x3 convolution (ResNeXt)
    base_width: int = 64  # bottleneck width = planes * base_width / 64 * cardinality
    num_channels: int = 3
    image_size: int = 224  # what the pipeline resizes to; the tower takes any size
    timm_model_name: str = "resnet50"

    model_type: ClassVar[str] = "timm_resnet"
    default_preprocess: ClassVar[Preprocess] = IMAGENET_PREPROCESS
    timm_architectures: ClassVar[tuple[str, ...]] = tuple(ARCHITECTURES)
    timm_pools: ClassVar[tuple[str, ...]] = ("", "avg")  # open_clip TimmModel pools this trunk builds

    @property
    def stochastic(self) -> bool:
        return False  # timm's drop_rate acts on the classifier we drop; drop_path_rate > 0 is refused

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "channels", tuple(self.channels))
        if self.block not in EXPANSION:
            raise ValueError(f"block {self.block!r} is not supported; supported: {sorted(EXPANSION)}")
        if len(self.layers) != len(self.channels):
            raise ValueError(f"layers {self.layers} and channels {self.channels} need one entry per stage")

    @property
    def hidden_size(self) -> int:
        """The pooled features' width."""
        return self.channels[-1] * EXPANSION[self.block]

    @classmethod
    def from_timm_name(cls, name: str, **timm_kwargs: Any) -> Self:
        """The config of `timm.create_model(name, **timm_kwargs)` (its trunk: the classifier is not built)."""
        fields = timm_config_fields(name, "ResNet", ARCHITECTURES, timm_kwargs, _KWARGS, _NO_EFFECT, _DEFAULTS)
        block, layers = ARCHITECTURES[name]
        return cls(**{"layers": layers, "block": block, "timm_model_name": name, **fields})

    @classmethod
    def tiny(cls) -> Self:
        """The golden fixture's shape (tests/golden/timm_resnet50): one Bottleneck per stage, narrow stages."""
        return cls.from_timm_name("resnet50", layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), img_size=64)


class Bottleneck(nnx.Module):
    def __init__(self, inplanes: int, planes: int, stride: int, config: TimmResNetConfig, *, dtype, rngs):
        width = int(planes * (config.base_width / 64)) * config.cardinality
        out = planes * 4
        self.conv1 = Conv2d(inplanes, width, 1, dtype=dtype, rngs=rngs)
        self.bn1 = BatchNorm(width, dtype=dtype)
        self.conv2 = Conv2d(width, width, 3, stride=stride, padding=1, groups=config.cardinality, dtype=dtype,
                            rngs=rngs)
        self.bn2 = BatchNorm(width, dtype=dtype)
        self.conv3 = Conv2d(width, out, 1, dtype=dtype, rngs=rngs)
        self.bn3 = BatchNorm(out, dtype=dtype)
        self.downsample = Downsample(inplanes, out, stride, dtype=dtype, rngs=rngs) \
            if stride != 1 or inplanes != out else None

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        shortcut = x if self.downsample is None else self.downsample(x, train)
        y = jax.nn.relu(self.bn1(self.conv1(x), train))
        y = jax.nn.relu(self.bn2(self.conv2(y), train))
        return jax.nn.relu(self.bn3(self.conv3(y), train) + shortcut)


class BasicBlock(nnx.Module):
    def __init__(self, inplanes: int, planes: int, stride: int, config: TimmResNetConfig, *, dtype, rngs):
        if config.cardinality != 1 or config.base_width != 64:
            raise ValueError("BasicBlock only supports cardinality 1 and base_width 64 (as timm)")
        self.conv1 = Conv2d(inplanes, planes, 3, stride=stride, padding=1, dtype=dtype, rngs=rngs)
        self.bn1 = BatchNorm(planes, dtype=dtype)
        self.conv2 = Conv2d(planes, planes, 3, padding=1, dtype=dtype, rngs=rngs)
        self.bn2 = BatchNorm(planes, dtype=dtype)
        self.downsample = Downsample(inplanes, planes, stride, dtype=dtype, rngs=rngs) \
            if stride != 1 or inplanes != planes else None

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        shortcut = x if self.downsample is None else self.downsample(x, train)
        y = jax.nn.relu(self.bn1(self.conv1(x), train))
        return jax.nn.relu(self.bn2(self.conv2(y), train) + shortcut)


class Downsample(nnx.Module):
    """timm's `downsample_conv`: nn.Sequential(1x1 strided conv, BatchNorm), saved as `downsample.0` / `.1`."""

    def __init__(self, inplanes: int, out: int, stride: int, *, dtype, rngs):
        self.conv = Conv2d(inplanes, out, 1, stride=stride, dtype=dtype, rngs=rngs)
        self.bn = BatchNorm(out, dtype=dtype)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        return self.bn(self.conv(x), train)


class TimmResNet(nnx.Module):
    """Returns (final feature map (batch, h, w, channels) or None, pooled (batch, channels))."""

    def __init__(self, config: TimmResNetConfig, *, dtype=jnp.float32, remat: bool = False, rngs: nnx.Rngs):
        self.config, self.remat = config, remat
        inplanes = 64  # timm's single 7x7 stem is 64 wide whatever the stages are
        self.conv1 = Conv2d(config.num_channels, inplanes, 7, stride=2, padding=3, dtype=dtype, rngs=rngs)
        self.bn1 = BatchNorm(inplanes, dtype=dtype)
        block_class = Bottleneck if config.block == "bottleneck" else BasicBlock
        for stage, (planes, count) in enumerate(zip(config.channels, config.layers)):
            blocks = []
            for index in range(count):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(block_class(inplanes, planes, stride, config, dtype=dtype, rngs=rngs))
                inplanes = planes * EXPANSION[config.block]
            setattr(self, f"layer{stage + 1}", nnx.List(blocks))

    def __call__(self, pixel_values: jax.Array, *, dropout_rng: jax.Array | None = None,
                 pooled_only: bool = False, train: bool = False):
        """pixel_values NHWC; `train` normalises with batch statistics and updates the running ones."""
        del dropout_rng  # no dropout in the trunk
        x = jax.nn.relu(self.bn1(self.conv1(pixel_values), train))
        x = max_pool(x, 3, 2, padding=1)
        for stage in range(len(self.config.layers)):
            for block in getattr(self, f"layer{stage + 1}"):
                x = (nnx.remat(lambda module, h: module(h, train))(block, x) if self.remat else block(x, train))
        pooled = global_avg_pool(x.astype(jnp.float32))
        return (None if pooled_only else x), pooled


def _block_rules(config: TimmResNetConfig, stage: int) -> list[Rule]:
    layer = f"layer{stage}.{{i}}"
    convs = ("conv1", "conv2", "conv3") if config.block == "bottleneck" else ("conv1", "conv2")
    rules = [r for c in convs for r in conv2d(f"{layer}.{c}", f"{layer}.{c}")]
    rules += [r for c in convs for r in batch_norm(f"{layer}.bn{c[-1]}", f"{layer}.bn{c[-1]}")]
    return [*rules, *conv2d(f"{layer}.downsample.0", f"{layer}.downsample.conv"),
            *batch_norm(f"{layer}.downsample.1", f"{layer}.downsample.bn")]


def timm_rules(config: TimmResNetConfig) -> list[Rule]:
    """timm / torchvision ResNet state dict keys (without `fc.*`)."""
    return [*conv2d("conv1", "conv1"), *batch_norm("bn1", "bn1"),
            *[r for stage in range(1, len(config.layers) + 1) for r in _block_rules(config, stage)]]


def conversion_rules(config: TimmResNetConfig, fmt: str) -> list[Rule]:
    return {"timm": timm_rules(config)}[fmt]


register(TowerSpec("timm_resnet", "vision", TimmResNetConfig, TimmResNet, conversion_rules,
                   prefixes={"timm": ("visual.trunk.", "trunk.", "")}, model_types=("timm_resnet",),
                   preprocess=TimmResNetConfig.default_preprocess, ignored_keys=TIMM_CLASSIFIER))
