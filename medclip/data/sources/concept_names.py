"""Readable names of UMLS concepts (CUI -> name), for the text the CLIP-TF report feeds its second text input and
for zero-shot classes. ROCOv2 ships them (`cui_mapping.csv`, `CUI,Canonical name`); ROCO v1 ships CUIs only, so
there a user passes a `CUI,name` CSV (`--concept_names FILE`).
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

log = logging.getLogger(__name__)

ROCOV2_MAPPING = "cui_mapping.csv"


class ConceptNamesError(ValueError):
    """A concept-names file that cannot be read as `CUI,name` rows."""


def read_concept_names(path: str | Path) -> dict[str, str]:
    """CUI -> name from a CSV of `CUI,name` rows (a header row naming a CUI column is skipped; ROCOv2's
    `cui_mapping.csv` has `CUI,Canonical name`). Tab-separated when the file says .tsv."""
    path = Path(path)
    if not path.is_file():
        raise ConceptNamesError(f"concept names: no file {path} (expected CSV rows CUI,name)")
    text = path.read_bytes().decode("utf-8", errors="replace").removeprefix("\ufeff")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    names: dict[str, str] = {}
    for number, row in enumerate(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter), start=1):
        if not row or not any(field.strip() for field in row):
            continue
        if number == 1 and row[0].strip().upper() in ("CUI", "CUIS", "ID", "CONCEPT"):
            continue  # the header
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise ConceptNamesError(f"{path}:{number}: expected CUI,name, got {delimiter.join(row)!r}")
        names[row[0].strip()] = row[1].strip()
    if not names:
        raise ConceptNamesError(f"{path}: no CUI,name rows")
    return names


def mapping_beside(source: str | Path) -> Path | None:
    """ROCOv2's `cui_mapping.csv` of a dataset: in its root folder, or beside one of its `<split>_captions.csv`."""
    source = Path(source)
    folder = source if source.is_dir() else source.parent
    candidate = folder / ROCOV2_MAPPING
    return candidate if candidate.is_file() else None


def concept_names_for(source: str | Path | None, names_file: str | Path | None = None) -> dict[str, str]:
    """The names a dataset's concepts are written with: `names_file` when given, else ROCOv2's own mapping when
    the source has one, else {} (the caller says so and falls back to the codes)."""
    if names_file:
        return read_concept_names(names_file)
    mapping = mapping_beside(source) if source else None
    if mapping is not None:
        log.info("concept names from %s", mapping)
        return read_concept_names(mapping)
    return {}


def name_concepts(concepts: Iterable[str], names: Mapping[str, str]) -> list[str]:
    """Each concept's name, the code itself where the mapping has none."""
    return [names.get(concept, concept) for concept in concepts]


def name_records(items: Iterable, names: Mapping[str, str]) -> int:
    """Writes each record's `concept_names` (its concepts through `names`, codes where unnamed); returns how many
    distinct concepts had no name. Nothing changes without names."""
    if not names:
        return 0
    unnamed = set()
    for record in items:
        record.concept_names = name_concepts(record.concepts, names)
        unnamed.update(c for c in record.concepts if c not in names)
    if unnamed:
        log.info("%d concepts have no name and are written as their codes (e.g. %s)", len(unnamed),
                 ", ".join(sorted(unnamed)[:5]))
    return len(unnamed)
