"""A convolution's static settings, shared by the kernels' CPU and plain forms."""

from __future__ import annotations

from typing import NamedTuple


class ConvSpec(NamedTuple):
    stride: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]
    dilation: tuple[int, int]
    groups: int
