"""Frozen dataclass configs that read and write Hugging Face `config.json` dictionaries."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Self


@dataclasses.dataclass(frozen=True)
class TowerConfig:
    """Base for tower configs: fields named as in transformers so `config.json` round-trips."""

    model_type: ClassVar[str] = ""

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> Self:
        """Keeps the fields this architecture uses; other keys (id2label, dtype, ...) do not matter here."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_hf_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, **dataclasses.asdict(self)}

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class VisionTowerConfig(TowerConfig):
    """What every vision tower's config answers, so that callers read attributes rather than guess with getattr.

    `stochastic` has no default: each tower says whether any dropout or drop path of its own is active, because
    an image-feature cache is only exact for a deterministic frozen tower."""

    default_preprocess: ClassVar[Any] = None  # a medclip.models.preprocess.Preprocess: how its source normalised
    timm_architectures: ClassVar[tuple[str, ...]] = ()  # timm names `from_timm_name` builds (none: not a timm tower)
    timm_pools: ClassVar[tuple[str, ...]] = ("",)  # open_clip TimmModel `timm_pool` values it builds ("": its own)

    @property
    def stochastic(self) -> bool:
        raise NotImplementedError(f"{type(self).__name__} must say whether it is stochastic (dropout, drop path)")

    @classmethod
    def from_timm_name(cls, name: str, **timm_kwargs: Any) -> Self:
        raise NotImplementedError(f"{cls.__name__} is not built from timm names")


@dataclasses.dataclass(frozen=True)
class TextTowerConfig(TowerConfig):
    """What every text tower's config answers (see VisionTowerConfig); `stochastic` likewise has no default."""

    pad_token_id: int = 0

    @property
    def stochastic(self) -> bool:
        raise NotImplementedError(f"{type(self).__name__} must say whether it is stochastic (dropout)")

    @property
    def has_pooler(self) -> bool:
        """A trained pooler layer (BERT's `pooler.dense`), which the `pooler_output` pooling reads."""
        return False

    @property
    def is_roberta(self) -> bool:
        """RoBERTa numbers positions from pad_token_id + 1, so it takes that many fewer tokens."""
        return False

