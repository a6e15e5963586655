"""The tower contract: how a tower is called (`VisionTower`, `TextTower`), what its config answers
(medclip.models.config_base's `VisionTowerConfig` / `TextTowerConfig`), what the registry knows of it
(`TowerSpec`), and the errors of asking for a tower that is not there.

Below every tower module and the registry; imports no tower."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import jax
from flax import nnx

from medclip.models.config_base import TextTowerConfig, VisionTowerConfig
from medclip.models.packing import PackingPlan
from medclip.models.preprocess import Preprocess
from medclip.models.weights import Rule


class VisionTower(Protocol):
    config: VisionTowerConfig

    def __call__(self, pixel_values: jax.Array, *, dropout_rng: jax.Array | None = None,
                 pooled_only: bool = False, train: bool = False) -> tuple[jax.Array | None, jax.Array]:
        """pixel_values (batch, height, width, channels) NHWC, normalised as the model's `Preprocess` says.

        Returns (hidden_states or None, pooled (batch, hidden_size)). `pooled_only` allows skipping work
        nothing pooled depends on (hidden_states is then None); `dropout_rng` None means no dropout; `train`
        selects batch statistics for towers that have running statistics (BatchNorm), and nothing else."""
        ...


class TextTower(Protocol):
    config: TextTowerConfig

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None, position_ids: jax.Array | None = None, *,
                 dropout_rng: jax.Array | None = None, pooled_only: bool = False,
                 packing: PackingPlan | None = None, pooler: str = "default") -> tuple[jax.Array | None, jax.Array]:
        """input_ids / attention_mask (batch, length), padding marked 0 in the mask.

        Returns (last_hidden_state (batch, length, hidden) or None, pooled (batch, hidden_size)). `packing`
        (a plan from medclip.models.packing.plan_packing on this batch's mask) runs the layers on real tokens
        only; `pooler` picks the pooled output (default, eos, cls, mean, pooler_output: what each tower
        supports, its error says)."""
        ...


@dataclasses.dataclass(frozen=True)
class TowerSpec:
    name: str  # the architecture name, e.g. "clip_vision_model", "timm_vit", "bert"
    kind: str  # vision | text
    config_class: type[VisionTowerConfig] | type[TextTowerConfig]
    module_class: Callable[..., nnx.Module]  # (config, *, dtype, remat, rngs) -> tower
    # checkpoint format -> rules for that format's keys (with its prefix stripped)
    rules: Callable[[Any, str], list[Rule]]
    # checkpoint format -> key prefixes under which that format stores this tower, most specific first
    prefixes: dict[str, tuple[str, ...]]
    model_types: tuple[str, ...] = ()  # the `model_type` values of config.json this tower reads
    preprocess: Preprocess | None = None  # vision towers: how their source normalised images
    # checkpoint keys (after the prefix) that this tower's source holds and the tower does not use: a timm
    # classifier (`fc.*`), which a trunk drops as timm's `num_classes=0` does
    ignored_keys: str | None = None

    def formats(self) -> tuple[str, ...]:
        return tuple(self.prefixes)


class UnknownTowerError(ValueError):
    """No registered tower of that name, model_type or config class."""


class UnknownArchitectureError(UnknownTowerError):
    """A checkpoint or config names an architecture (a timm model name) no tower can build."""


class UnsupportedOptionError(UnknownArchitectureError):
    """A known architecture with an option (a timm keyword argument, its value) its tower does not build."""
