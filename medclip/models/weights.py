"""Weight-name rules: how a checkpoint's (PyTorch-layout) keys map onto our NNX parameter paths.

Each tower module keeps, next to its code, one table of `Rule`s per checkpoint format it can come from
(`RULES["hf"]`, `RULES["openclip"]`, ...). A rule is `checkpoint key template -> our key template, transform`,
where `{i}` is a layer index. The same table converts both ways (medclip.checkpoints.conversion), so loading
and saving cannot drift apart. This module only names things: it holds no arrays and imports nothing heavy,
so the model code never depends on the checkpoint loader.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

# identity | linear (torch (out, in) -> (in, out)) | conv (OIHW -> HWIO) | position (a position table, resized on
# load when the image size differs) | cls_token (timm's (1, 1, d) -> (d,)) | batched_position (timm's (1, n, d)
# position table, resized like `position`) | one (a scalar stored as a 1-element vector: SigLIP's logit_scale)
TRANSFORMS = ("identity", "linear", "conv", "position", "cls_token", "batched_position", "one")


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # e.g. "encoder.layer.{i}.attention.self.query.weight"
    ours: str  # e.g. "encoder.layers.{i}.self_attn.q_proj.kernel"
    transform: str = "identity"
    # (index, count): this parameter is chunk `index` of `count` equal chunks along axis 0 of the checkpoint
    # tensor, as OpenCLIP's fused `in_proj_weight` and timm's `qkv` hold q, k and v.
    part: tuple[int, int] | None = None

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {self.transform!r}; known: {TRANSFORMS}")

    @staticmethod
    def _regex(template: str) -> re.Pattern:
        return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")

    def match_hf(self, key: str) -> str | None:
        m = self._regex(self.hf).match(key)
        return None if m is None else self.ours.format(**m.groupdict())

    def match_ours(self, key: str) -> str | None:
        m = self._regex(self.ours).match(key)
        return None if m is None else self.hf.format(**m.groupdict())


def linear(hf: str, ours: str, bias: bool = True) -> list[Rule]:
    rules = [Rule(f"{hf}.weight", f"{ours}.kernel", "linear")]
    return rules + ([Rule(f"{hf}.bias", f"{ours}.bias")] if bias else [])


def fused_linear(hf: str, ours: list[str], bias: bool = True, sep: str = ".") -> list[Rule]:
    """One checkpoint linear holding several of ours stacked on its output axis (q, k, v). `sep` "_" for
    nn.MultiheadAttention's `in_proj_weight` / `in_proj_bias`."""
    n = len(ours)
    rules = [Rule(f"{hf}{sep}weight", f"{o}.kernel", "linear", (i, n)) for i, o in enumerate(ours)]
    return rules + ([Rule(f"{hf}{sep}bias", f"{o}.bias", "identity", (i, n)) for i, o in enumerate(ours)]
                    if bias else [])


def norm(hf: str, ours: str) -> list[Rule]:
    return [Rule(f"{hf}.weight", f"{ours}.scale"), Rule(f"{hf}.bias", f"{ours}.bias")]


def embedding(hf: str, ours: str, transform: str = "identity") -> list[Rule]:
    return [Rule(f"{hf}.weight", f"{ours}.embedding", transform)]


def prefixed(prefix: str, rules: Iterable[Rule], ours_prefix: str) -> list[Rule]:
    return [dataclasses.replace(r, hf=prefix + r.hf, ours=ours_prefix + r.ours) for r in rules]


def conv2d(hf: str, ours: str, bias: bool = False) -> list[Rule]:
    """A torch Conv2d (OIHW) onto medclip.models.conv.Conv2d (HWIO `kernel`)."""
    return [Rule(f"{hf}.weight", f"{ours}.kernel", "conv")] + ([Rule(f"{hf}.bias", f"{ours}.bias")] if bias else [])


def batch_norm(hf: str, ours: str) -> list[Rule]:
    """A torch BatchNorm2d: affine parameters and running statistics (`num_batches_tracked` is not used)."""
    return [Rule(f"{hf}.weight", f"{ours}.scale"), Rule(f"{hf}.bias", f"{ours}.bias"),
            Rule(f"{hf}.running_mean", f"{ours}.mean"), Rule(f"{hf}.running_var", f"{ours}.var")]
