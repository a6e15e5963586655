"""What concept-aware losses read from a batch: each example's concept set as fixed-width ids, and a group
id shared by examples whose captions are identical once normalised.

    vocab = ConceptVocabulary.build(train_records)           # concepts in >= 2 training records
    ids, truncated = vocab.encode(records, width=16)          # (n, 16) int32, -1 padding
    groups = caption_group_ids(captions)                      # (n,) int32

A concept seen in a single training record can never be shared by two training examples, so it is left out
of the vocabulary (it would only enlarge the union of its set). A set larger than `width` keeps its `width`
most frequent concepts (the ones most likely to be shared); the number of sets cut is reported by the data
feed in `data_report.json` (changed: concept_set_truncated).
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Sequence

import numpy as np

from medclip.data.fields import Field
from medclip.data.records import DropCounter, Record

DEFAULT_CONCEPT_WIDTH = 16
PAD = -1
CONCEPT_SOURCES = ("cuis", "semtypes", "both")


def concept_set(record: Record, source: str = "cuis") -> list[str]:
    """The concepts a concept-aware loss compares: the record's UMLS CUIs, their semantic types (T-codes, which
    cannot collide with C-prefixed CUIs), or both."""
    if source == "cuis":
        return record.concepts
    if source == "semtypes":
        return record.semantic_types
    if source == "both":
        return [*record.concepts, *record.semantic_types]
    raise ValueError(f"concept source must be one of {CONCEPT_SOURCES}, not {source!r}")


@dataclasses.dataclass(frozen=True)
class ConceptVocabulary:
    ids: dict[str, int]  # concept -> id, most frequent first
    source: str = "cuis"  # which of a record's concept sets (`concept_set`) it was built from and encodes

    @classmethod
    def build(cls, items: Sequence[Record], min_count: int = 2, source: str = "cuis") -> "ConceptVocabulary":
        """Concepts (`concept_set(record, source)`) carried by at least `min_count` records (each record counts
        once), most frequent first, ties by name (deterministic)."""
        counts = collections.Counter(c for record in items for c in set(concept_set(record, source)))
        kept = sorted((c for c, n in counts.items() if n >= min_count), key=lambda c: (-counts[c], c))
        return cls({c: i for i, c in enumerate(kept)}, source)

    def __len__(self) -> int:
        return len(self.ids)

    def encode(self, items: Sequence[Record], width: int = DEFAULT_CONCEPT_WIDTH) -> tuple[np.ndarray, list[str]]:
        """(len(items), width) int32 ids, sorted ascending (= most frequent first), -1 padding; and the ids of
        the records whose set (within the vocabulary) was longer than `width` and got cut."""
        if width < 1:
            raise ValueError(f"concept width must be >= 1, not {width}")
        out = np.full((len(items), width), PAD, np.int32)
        truncated = []
        for row, record in enumerate(items):
            known = sorted({self.ids[c] for c in concept_set(record, self.source) if c in self.ids})
            if len(known) > width:
                truncated.append(record.id)
            known = known[:width]
            out[row, :len(known)] = known
        return out, truncated


_SPACE = re.compile(r"\s+")


def normalise_caption(caption: str) -> str:
    """Case, runs of whitespace and trailing punctuation do not make two captions different."""
    return _SPACE.sub(" ", caption.lower()).strip().rstrip(".;:, ")


def caption_group_ids(captions: Sequence[str]) -> np.ndarray:
    """(n,) int32: equal exactly for captions equal after `normalise_caption`, numbered in first-seen order."""
    groups: dict[str, int] = {}
    return np.array([groups.setdefault(normalise_caption(c), len(groups)) for c in captions], np.int32)


def concept_field(items: Sequence[Record], vocab: ConceptVocabulary, width: int = DEFAULT_CONCEPT_WIDTH,
                  counter: DropCounter | None = None) -> Field:
    """The batch fields of concept-aware losses: "concept_ids" (width,) per record, -1 padding, and
    "caption_group" per caption row (captions laid out as `pipeline.tokenize_captions` lays them out). The sets cut
    to `width` are counted in `counter` (changed: concept_set_truncated)."""
    concept_ids, truncated = vocab.encode(items, width)
    groups = caption_group_ids([caption for record in items for caption in record.captions])
    if counter is not None:
        counter.change("concept_set_truncated", len(truncated), example=", ".join(truncated[:3]))
    return Field(per_record={"concept_ids": concept_ids}, per_caption={"caption_group": groups})
