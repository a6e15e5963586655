"""OpenAI CLIP's ModifiedResNet (RN50, RN101, RN50x4...), as open_clip and PMC-CLIP build it.

A stem of three 3x3 convolutions and an average pool; anti-aliased bottlenecks (an average pool before the
strided 1x1 convolution, and in the shortcut); attention pooling: the spatial mean prepended as a query token,
a learned position embedding, one multi-head attention whose output at that token, projected by `c_proj`, is the
image embedding. The tower's pooled output is therefore already `output_dim` wide, and its head is `none`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Self

import jax
import jax.numpy as jnp
from flax import nnx

from medclip.models.config_base import VisionTowerConfig
from medclip.models.conv import BatchNorm, Conv2d, avg_pool
from medclip.models.kernels import attention
from medclip.models.layers import linear
from medclip.models.preprocess import CLIP_PREPROCESS, Preprocess
from medclip.models.registry import register
from medclip.models.tower_contract import TowerSpec
from medclip.models.weights import Rule, batch_norm, conv2d

EXPANSION = 4


@dataclasses.dataclass(frozen=True)
class ModifiedResNetConfig(VisionTowerConfig):
    layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    width: int = 64
    heads: int = 32  # open_clip: width * 32 // head_width (head_width 64)
    output_dim: int = 1024
    image_size: int = 224
    batch_norm_eps: float = 1e-5

    model_type: ClassVar[str] = "modified_resnet"
    default_preprocess: ClassVar[Preprocess] = CLIP_PREPROCESS

    @property
    def stochastic(self) -> bool:
        return False  # no dropout, no drop path

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
        if len(self.layers) != 4:
            raise ValueError(f"ModifiedResNet has 4 stages, got layers={self.layers}")
        if self.image_size % 32:
            raise ValueError(f"ModifiedResNet needs an image size divisible by 32, got {self.image_size}")
        if (self.width * 32) % self.heads:
            raise ValueError(f"attention pool width {self.width * 32} does not divide into {self.heads} heads")

    @property
    def hidden_size(self) -> int:
        """The pooled output's width (what a head projects from)."""
        return self.output_dim

    @classmethod
    def rn50(cls, output_dim: int = 1024) -> Self:
        """OpenAI / open_clip RN50 (output 1024); PMC-CLIP's RN50_fusion4 projects to 768."""
        return cls(output_dim=output_dim)

    @classmethod
    def tiny(cls) -> Self:
        return cls(layers=(1, 1, 1, 1), width=8, heads=4, output_dim=16, image_size=64)


class Bottleneck(nnx.Module):
    def __init__(self, inplanes: int, planes: int, stride: int, eps: float, *, dtype, rngs: nnx.Rngs):
        out = planes * EXPANSION
        self.conv1 = Conv2d(inplanes, planes, 1, dtype=dtype, rngs=rngs)
        self.bn1 = BatchNorm(planes, eps=eps, dtype=dtype)
        self.conv2 = Conv2d(planes, planes, 3, padding=1, dtype=dtype, rngs=rngs)
        self.bn2 = BatchNorm(planes, eps=eps, dtype=dtype)
        self.conv3 = Conv2d(planes, out, 1, dtype=dtype, rngs=rngs)
        self.bn3 = BatchNorm(out, eps=eps, dtype=dtype)
        self.stride = stride
        if stride > 1 or inplanes != out:  # torch: downsample = Sequential(AvgPool2d, Conv2d 1x1, BatchNorm2d)
            self.downsample_conv = Conv2d(inplanes, out, 1, dtype=dtype, rngs=rngs)
            self.downsample_bn = BatchNorm(out, eps=eps, dtype=dtype)
        else:
            self.downsample_conv = self.downsample_bn = None

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out = jax.nn.relu(self.bn1(self.conv1(x), train))
        out = jax.nn.relu(self.bn2(self.conv2(out), train))
        if self.stride > 1:
            out = avg_pool(out, self.stride)
        out = self.bn3(self.conv3(out), train)
        identity = x
        if self.downsample_conv is not None:
            if self.stride > 1:
                identity = avg_pool(identity, self.stride)
            identity = self.downsample_bn(self.downsample_conv(identity), train)
        return jax.nn.relu(out + identity)


class AttentionPool2d(nnx.Module):
    def __init__(self, grid: int, width: int, heads: int, output_dim: int, *, dtype, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(width ** -0.5)
        self.positional_embedding = nnx.Param(init(rngs.params(), (grid * grid + 1, width)))
        self.q_proj = nnx.Linear(width, width, dtype=dtype, rngs=rngs)
        self.k_proj = nnx.Linear(width, width, dtype=dtype, rngs=rngs)
        self.v_proj = nnx.Linear(width, width, dtype=dtype, rngs=rngs)
        self.c_proj = nnx.Linear(width, output_dim, dtype=dtype, rngs=rngs)
        self.heads, self.dtype = heads, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """(batch, h, w, width) -> (batch, output_dim): the output at the prepended mean token only (nothing
        else of torch's full attention output is read)."""
        batch, h, w, width = x.shape
        tokens = x.reshape(batch, h * w, width)
        tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
        tokens = tokens + self.positional_embedding[...].astype(tokens.dtype)[None]
        head_dim = width // self.heads

        def split(y):  # (batch, length, width) -> (batch, length, heads, head_dim)
            return y.reshape(batch, -1, self.heads, head_dim)

        q = split(linear(self.q_proj, tokens[:, :1]) / math.sqrt(head_dim))
        k, v = split(linear(self.k_proj, tokens)), split(linear(self.v_proj, tokens))
        context = attention(q, k, v, None).reshape(batch, width)
        return linear(self.c_proj, context)


class ModifiedResNet(nnx.Module):
    """Returns (feature map (batch, h/32, w/32, width*32) or None, pooled (batch, output_dim))."""

    def __init__(self, config: ModifiedResNetConfig, *, dtype=jnp.float32, remat: bool = False, rngs: nnx.Rngs):
        del remat  # per-block rematerialisation is not wired for convolutional towers
        self.config = config
        w, eps = config.width, config.batch_norm_eps
        self.conv1 = Conv2d(3, w // 2, 3, stride=2, padding=1, dtype=dtype, rngs=rngs)
        self.bn1 = BatchNorm(w // 2, eps=eps, dtype=dtype)
        self.conv2 = Conv2d(w // 2, w // 2, 3, padding=1, dtype=dtype, rngs=rngs)
        self.bn2 = BatchNorm(w // 2, eps=eps, dtype=dtype)
        self.conv3 = Conv2d(w // 2, w, 3, padding=1, dtype=dtype, rngs=rngs)
        self.bn3 = BatchNorm(w, eps=eps, dtype=dtype)
        inplanes = w
        for stage, blocks in enumerate(config.layers):
            planes, stride = w * 2 ** stage, 1 if stage == 0 else 2
            layer = []
            for i in range(blocks):
                layer.append(Bottleneck(inplanes, planes, stride if i == 0 else 1, eps, dtype=dtype, rngs=rngs))
                inplanes = planes * EXPANSION
            setattr(self, f"layer{stage + 1}", nnx.List(layer))
        self.attnpool = AttentionPool2d(config.image_size // 32, w * 32, config.heads, config.output_dim,
                                        dtype=dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, pixel_values: jax.Array, *, dropout_rng: jax.Array | None = None, pooled_only: bool = False,
                 train: bool = False) -> tuple[jax.Array | None, jax.Array]:
        del dropout_rng  # no dropout in this tower
        size = self.config.image_size
        if pixel_values.shape[1:] != (size, size, 3):
            raise ValueError(f"pixel_values must be NHWC (batch, {size}, {size}, 3) for this tower (its attention "
                             f"pool has a {size // 32}x{size // 32} grid), got {pixel_values.shape}")
        x = pixel_values.astype(self.dtype)
        for i in (1, 2, 3):
            x = jax.nn.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x), train))
        x = avg_pool(x, 2)
        for stage in range(1, 5):
            for block in getattr(self, f"layer{stage}"):
                x = block(x, train)
        return (None if pooled_only else x), self.attnpool(x)


def _block_rules(stage: int) -> list[Rule]:
    hf, ours = f"layer{stage}.{{i}}", f"layer{stage}.{{i}}"
    return [*[r for n in (1, 2, 3) for r in (*conv2d(f"{hf}.conv{n}", f"{ours}.conv{n}"),
                                             *batch_norm(f"{hf}.bn{n}", f"{ours}.bn{n}"))],
            *conv2d(f"{hf}.downsample.0", f"{ours}.downsample_conv"),
            *batch_norm(f"{hf}.downsample.1", f"{ours}.downsample_bn")]


# open_clip / OpenAI / PMC-CLIP `visual.*` keys (the same module everywhere)
RULES = [
    *[r for n in (1, 2, 3) for r in (*conv2d(f"conv{n}", f"conv{n}"), *batch_norm(f"bn{n}", f"bn{n}"))],
    *[r for stage in (1, 2, 3, 4) for r in _block_rules(stage)],
    Rule("attnpool.positional_embedding", "attnpool.positional_embedding"),
    *[r for p in ("q", "k", "v", "c") for r in (Rule(f"attnpool.{p}_proj.weight", f"attnpool.{p}_proj.kernel", "linear"),
                                                Rule(f"attnpool.{p}_proj.bias", f"attnpool.{p}_proj.bias"))],
]


def conversion_rules(config: ModifiedResNetConfig, fmt: str) -> list[Rule]:
    del config
    return {"openclip": RULES}[fmt]


def config_from_open_clip(vision_cfg: dict[str, Any], embed_dim: int) -> ModifiedResNetConfig:
    """open_clip builds ModifiedResNet(layers, output_dim=embed_dim, heads=width * 32 // head_width, image_size,
    width) when vision_cfg.layers is a list."""
    width = vision_cfg.get("width", 64)
    return ModifiedResNetConfig(layers=tuple(vision_cfg["layers"]), width=width,
                                heads=width * 32 // vision_cfg.get("head_width", 64), output_dim=embed_dim,
                                image_size=vision_cfg.get("image_size", 224))


register(TowerSpec("modified_resnet", "vision", ModifiedResNetConfig, ModifiedResNet, conversion_rules,
                   prefixes={"openclip": ("visual.", "")}, model_types=("modified_resnet",),
                   preprocess=ModifiedResNetConfig.default_preprocess))
