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
