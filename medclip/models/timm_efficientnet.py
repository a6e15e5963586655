"""timm's EfficientNetV2 as a vision tower: `tf_efficientnetv2_s` and `tf_efficientnetv2_m` (the TensorFlow-ported
weights of the paper's models, "CLIP TensorFlow & ROCO"'s image encoders).

A 3x3 stride-2 stem, stages of ConvBnAct, EdgeResidual (FusedMBConv) and InvertedResidual (MBConv, with
squeeze-and-excitation) blocks, a 1x1 `conv_head` + BatchNorm, SiLU throughout, then a global average pool:
pooled (batch, 1280). The tf_ variants use TensorFlow's "same" padding and BatchNorm epsilon 1e-3. The blocks
come from timm's `arch_def` strings, with its channel rounding (`round_channels` / `make_divisible`) and depth
scaling, so `channel_multiplier` / `depth_multiplier` build what timm builds. Parameter names mirror timm's
(`blocks.S.B.conv_pw`, `.se.conv_reduce`, ...); a checkpoint's `classifier.*` is skipped.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Self

import jax
import jax.numpy as jnp
from flax import nnx

from medclip.models.config_base import VisionTowerConfig
from medclip.models.conv import BatchNorm, Conv2d, global_avg_pool
from medclip.models.preprocess import Preprocess
from medclip.models.registry import register
from medclip.models.timm_options import TIMM_CLASSIFIER, timm_config_fields
from medclip.models.tower_contract import TowerSpec, UnknownArchitectureError
from medclip.models.weights import Rule, batch_norm, conv2d

# timm's _gen_efficientnetv2_s / _m: arch_def (one block string per stage), stem width, head width, and whether
# the head width is scaled by channel_multiplier (it is for -S, not for -M), pretrained input size
ARCHITECTURES = {
    "tf_efficientnetv2_s": dict(
        arch_def=("cn_r2_k3_s1_e1_c24_skip", "er_r4_k3_s2_e4_c48", "er_r4_k3_s2_e4_c64", "ir_r6_k3_s2_e4_c128_se0.25",
                  "ir_r9_k3_s1_e6_c160_se0.25", "ir_r15_k3_s2_e6_c256_se0.25"),
        stem=24, features=1280, round_features=True, image_size=300),
    "tf_efficientnetv2_m": dict(
        arch_def=("cn_r3_k3_s1_e1_c24_skip", "er_r5_k3_s2_e4_c48", "er_r5_k3_s2_e4_c80", "ir_r7_k3_s2_e4_c160_se0.25",
                  "ir_r14_k3_s1_e6_c176_se0.25", "ir_r18_k3_s2_e6_c304_se0.25", "ir_r5_k3_s1_e6_c512_se0.25"),
        stem=24, features=1280, round_features=False, image_size=384),
}
TF_BN_EPS = 1e-3  # timm's BN_EPS_TF_DEFAULT
INCEPTION_PREPROCESS = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # timm's pretrained_cfg for both
_KWARGS = {"channel_multiplier": "channel_multiplier", "depth_multiplier": "depth_multiplier",
           "in_chans": "num_channels", "img_size": "image_size"}
_NO_EFFECT = {"num_classes", "drop_rate"}  # the classifier, which a trunk does not build
_DEFAULTS = {"global_pool": ("avg", ""), "drop_path_rate": (0.0, None), "output_stride": (32, None),
             "group_size": (None,), "bn_eps": (TF_BN_EPS,), "pad_type": ("same",)}


def make_divisible(v: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """timm.layers.make_divisible: the nearest multiple of `divisor`, never more than 10% below `v`."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < round_limit * v else new_v


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One block as timm's EfficientNetBuilder resolves it."""
    kind: str  # cn (ConvBnAct) | er (EdgeResidual) | ir (InvertedResidual)
    in_chs: int
    out_chs: int
    kernel: int
    stride: int
    mid_chs: int  # expansion width (er, ir); out_chs for cn
    se_chs: int  # squeeze-and-excitation width, 0 without SE
    skip: bool  # residual connection


def _decode(block: str) -> tuple[str, dict[str, Any]]:
    """An arch_def string ('ir_r6_k3_s2_e4_c128_se0.25'): block type and its options (r, k, s, e, c, se, skip)."""
    kind, *ops = block.split("_")
    opts: dict[str, Any] = {"skip": None}
    for op in ops:
        if op in ("skip", "noskip"):
            opts["skip"] = op == "skip"
        else:
            key = op.rstrip("0123456789.")
            opts[key] = float(op[len(key):])
    return kind, opts


@dataclasses.dataclass(frozen=True)
class TimmEfficientNetConfig(VisionTowerConfig):
    timm_model_name: str = "tf_efficientnetv2_s"
    channel_multiplier: float = 1.0
    depth_multiplier: float = 1.0
    num_channels: int = 3
    image_size: int = 300  # what the pipeline resizes to (timm's pretrained input); the tower takes any size

    model_type: ClassVar[str] = "timm_efficientnet"
    default_preprocess: ClassVar[Preprocess] = INCEPTION_PREPROCESS
    timm_architectures: ClassVar[tuple[str, ...]] = tuple(ARCHITECTURES)
    timm_pools: ClassVar[tuple[str, ...]] = ("", "avg")  # open_clip TimmModel pools this trunk builds
    padding: ClassVar[str] = "same"  # the tf_ variants
    bn_eps: ClassVar[float] = TF_BN_EPS

    @property
    def stochastic(self) -> bool:
        return False  # timm's drop_rate acts on the classifier we drop; drop_path_rate > 0 is refused

    def __post_init__(self):
        if self.timm_model_name not in ARCHITECTURES:
            raise UnknownArchitectureError(f"timm architecture {self.timm_model_name!r} is not a supported "
                                           f"EfficientNet; supported: {sorted(ARCHITECTURES)}")

    def round_channels(self, channels: int) -> int:
        return make_divisible(channels * self.channel_multiplier) if self.channel_multiplier else channels

    @property
    def stem_chs(self) -> int:
        return self.round_channels(ARCHITECTURES[self.timm_model_name]["stem"])

    @property
    def hidden_size(self) -> int:
        """The pooled features' width (conv_head's)."""
        arch = ARCHITECTURES[self.timm_model_name]
        return self.round_channels(arch["features"]) if arch["round_features"] else arch["features"]

    def stages(self) -> list[list[BlockSpec]]:
        """Every block, stage by stage, with timm's channel rounding and depth scaling ('ceil')."""
        in_chs, stages = self.stem_chs, []
        for block in ARCHITECTURES[self.timm_model_name]["arch_def"]:
            kind, o = _decode(block)
            repeats = math.ceil(o["r"] * self.depth_multiplier)
            out_chs, exp = self.round_channels(int(o["c"])), o.get("e", 1.0)
            stage = []
            for index in range(repeats):
                stride = int(o["s"]) if index == 0 else 1
                mid = out_chs if kind == "cn" else make_divisible(in_chs * exp)
                # the SE ratio is relative to the block input: timm divides it by the expansion
                se = round(mid * o["se"] / exp) if o.get("se") else 0
                residual = o["skip"] is True if kind == "cn" else o["skip"] is not False
                stage.append(BlockSpec(kind, in_chs, out_chs, int(o["k"]), stride, mid, se,
                                       residual and stride == 1 and in_chs == out_chs))
                in_chs = out_chs
            stages.append(stage)
        return stages

    @classmethod
    def from_timm_name(cls, name: str, **timm_kwargs: Any) -> Self:
        """The config of `timm.create_model(name, **timm_kwargs)` (its trunk: the classifier is not built)."""
        fields = timm_config_fields(name, "EfficientNet", ARCHITECTURES, timm_kwargs, _KWARGS, _NO_EFFECT,
                                    _DEFAULTS)
        return cls(**{"image_size": ARCHITECTURES[name]["image_size"], "timm_model_name": name, **fields})

    @classmethod
    def tiny(cls) -> Self:
        """The golden fixture's shape (tests/golden/timm_efficientnetv2_tiny): 1/8 of the widths, 1/4 the depth."""
        return cls.from_timm_name("tf_efficientnetv2_s", channel_multiplier=0.125, depth_multiplier=0.25,
                                  img_size=64)


class SqueezeExcite(nnx.Module):
    """timm's SqueezeExcite: global mean -> 1x1 conv -> SiLU -> 1x1 conv -> sigmoid gate on the input."""

    def __init__(self, channels: int, reduced: int, *, dtype, rngs):
        self.conv_reduce = Conv2d(channels, reduced, 1, bias=True, dtype=dtype, rngs=rngs)
        self.conv_expand = Conv2d(reduced, channels, 1, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        s = x.mean(axis=(1, 2), keepdims=True)  # (batch, 1, 1, channels)
        return x * jax.nn.sigmoid(self.conv_expand(jax.nn.silu(self.conv_reduce(s))))


class Block(nnx.Module):
    """ConvBnAct (`conv`, `bn1`), EdgeResidual (`conv_exp`, `bn1`, [`se`], `conv_pwl`, `bn2`) or
    InvertedResidual (`conv_pw`, `bn1`, `conv_dw`, `bn2`, `se`, `conv_pwl`, `bn3`), as timm names them."""

    def __init__(self, spec: BlockSpec, config: TimmEfficientNetConfig, *, dtype, rngs):
        self.spec = spec
        pad, eps = config.padding, config.bn_eps

        def conv_bn(conv_name, bn_name, cin, cout, kernel, stride=1, groups=1):
            setattr(self, conv_name, Conv2d(cin, cout, kernel, stride=stride, padding=pad, groups=groups,
                                            dtype=dtype, rngs=rngs))
            setattr(self, bn_name, BatchNorm(cout, eps=eps, dtype=dtype))

        s = spec
        if s.kind == "cn":
            conv_bn("conv", "bn1", s.in_chs, s.out_chs, s.kernel, s.stride)
        elif s.kind == "er":
            conv_bn("conv_exp", "bn1", s.in_chs, s.mid_chs, s.kernel, s.stride)
            conv_bn("conv_pwl", "bn2", s.mid_chs, s.out_chs, 1)
        elif s.kind == "ir":
            conv_bn("conv_pw", "bn1", s.in_chs, s.mid_chs, 1)
            conv_bn("conv_dw", "bn2", s.mid_chs, s.mid_chs, s.kernel, s.stride, groups=s.mid_chs)
            conv_bn("conv_pwl", "bn3", s.mid_chs, s.out_chs, 1)
        else:
            raise ValueError(f"unknown EfficientNet block type {s.kind!r}")
        self.se = SqueezeExcite(s.mid_chs, s.se_chs, dtype=dtype, rngs=rngs) if s.se_chs else None

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kind = self.spec.kind
        if kind == "cn":
            y = jax.nn.silu(self.bn1(self.conv(x), train))
        else:
            if kind == "er":
                y = jax.nn.silu(self.bn1(self.conv_exp(x), train))
            else:
                y = jax.nn.silu(self.bn1(self.conv_pw(x), train))
                y = jax.nn.silu(self.bn2(self.conv_dw(y), train))
            if self.se is not None:
                y = self.se(y)
            y = (self.bn2 if kind == "er" else self.bn3)(self.conv_pwl(y), train)  # linear: no activation
        return y + x if self.spec.skip else y


class TimmEfficientNet(nnx.Module):
    """Returns (final feature map (batch, h, w, features) or None, pooled (batch, features))."""

    def __init__(self, config: TimmEfficientNetConfig, *, dtype=jnp.float32, remat: bool = False, rngs: nnx.Rngs):
        self.config, self.remat = config, remat
        stages = config.stages()
        self.conv_stem = Conv2d(config.num_channels, config.stem_chs, 3, stride=2, padding=config.padding,
                                dtype=dtype, rngs=rngs)
        self.bn1 = BatchNorm(config.stem_chs, eps=config.bn_eps, dtype=dtype)
        self.blocks = nnx.List([nnx.List([Block(b, config, dtype=dtype, rngs=rngs) for b in stage])
                                for stage in stages])
        self.conv_head = Conv2d(stages[-1][-1].out_chs, config.hidden_size, 1, padding=config.padding, dtype=dtype,
                                rngs=rngs)
        self.bn2 = BatchNorm(config.hidden_size, eps=config.bn_eps, dtype=dtype)

    def __call__(self, pixel_values: jax.Array, *, dropout_rng: jax.Array | None = None,
                 pooled_only: bool = False, train: bool = False):
        """pixel_values NHWC; `train` normalises with batch statistics and updates the running ones."""
        del dropout_rng  # no dropout in the trunk (timm's drop_rate acts on the classifier)
        x = jax.nn.silu(self.bn1(self.conv_stem(pixel_values), train))
        for stage in self.blocks:
            for block in stage:
                x = nnx.remat(lambda module, h: module(h, train))(block, x) if self.remat else block(x, train)
        x = jax.nn.silu(self.bn2(self.conv_head(x), train))
        pooled = global_avg_pool(x.astype(jnp.float32))
        return (None if pooled_only else x), pooled


def _stage_rules(stage: int, first: BlockSpec) -> list[Rule]:
    b = f"blocks.{stage}.{{i}}"
    names = {"cn": [("conv", "bn1")], "er": [("conv_exp", "bn1"), ("conv_pwl", "bn2")],
             "ir": [("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")]}[first.kind]
    rules = [r for c, n in names for r in (*conv2d(f"{b}.{c}", f"{b}.{c}"), *batch_norm(f"{b}.{n}", f"{b}.{n}"))]
    if first.se_chs:
        rules += [*conv2d(f"{b}.se.conv_reduce", f"{b}.se.conv_reduce", bias=True),
                  *conv2d(f"{b}.se.conv_expand", f"{b}.se.conv_expand", bias=True)]
    return rules


def timm_rules(config: TimmEfficientNetConfig) -> list[Rule]:
    """timm EfficientNet state dict keys (without `classifier.*`); one block type per stage."""
    return [*conv2d("conv_stem", "conv_stem"), *batch_norm("bn1", "bn1"),
            *[r for s, stage in enumerate(config.stages()) for r in _stage_rules(s, stage[0])],
            *conv2d("conv_head", "conv_head"), *batch_norm("bn2", "bn2")]


def conversion_rules(config: TimmEfficientNetConfig, fmt: str) -> list[Rule]:
    return {"timm": timm_rules(config)}[fmt]


register(TowerSpec("timm_efficientnet", "vision", TimmEfficientNetConfig, TimmEfficientNet, conversion_rules,
                   prefixes={"timm": ("visual.trunk.", "trunk.", "")}, model_types=("timm_efficientnet",),
                   preprocess=TimmEfficientNetConfig.default_preprocess, ignored_keys=TIMM_CLASSIFIER))
