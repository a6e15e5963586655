"""The record every source yields, and the counter that accounts for every record a source drops."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from pathlib import Path

from medclip.storage import is_url, write_text


@dataclasses.dataclass
class Record:
    """One image with its captions.

    `image` is a path to an encoded image file or the encoded bytes themselves. `source` says where the record
    came from ("captions.txt:12") so that errors can name it.
    """

    id: str
    image: str | bytes
    captions: list[str]
    concepts: list[str] = dataclasses.field(default_factory=list)
    keywords: list[str] = dataclasses.field(default_factory=list)
    # UMLS semantic types of the concepts (ROCO's semtypes.txt: T-codes such as T060), for --concept_source
    semantic_types: list[str] = dataclasses.field(default_factory=list)
    source: str = ""
    # The source's other text fields (CSV columns, JSON string fields), e.g. for --second_text_field.
    fields: dict[str, str] = dataclasses.field(default_factory=dict)
    # The concepts' readable names, same order (medclip.data.sources.concept_names); empty when unknown
    concept_names: list[str] = dataclasses.field(default_factory=list)

    def to_json(self, relative_to: str | Path | None = None) -> dict:
        """The JSON-lines form (`image_path` + `captions`, the original medclip format, plus our fields).

        With `relative_to`, the image path is written relative to that folder (with `..` where needed) unless the
        two share nothing but the filesystem root; otherwise it is absolute.
        """
        if isinstance(self.image, bytes):
            raise TypeError(f"record {self.id} holds image bytes; write them to a file before exporting to JSON lines")
        if is_url(self.image):  # an object in a bucket: its URL is already absolute
            image_path = self.image
        else:
            image_path = str(Path(self.image).resolve())
        if relative_to is not None and not is_url(image_path) and not is_url(relative_to):
            folder = str(Path(relative_to).resolve())
            if os.path.commonpath([image_path, folder]) != os.path.abspath(os.sep):
                image_path = os.path.relpath(image_path, folder)
        return {
            "id": self.id,
            "image_path": image_path,
            "captions": list(self.captions),
            "concepts": list(self.concepts),
            "keywords": list(self.keywords),
            **({"semantic_types": list(self.semantic_types)} if self.semantic_types else {}),
        }


# Reasons for dropping a record. Sources may add their own; these are the ones the library uses.
MISSING_FILE = "missing_file"
EMPTY_FILE = "empty_file"
NOT_AN_IMAGE = "not_an_image"
UNSUPPORTED_IMAGE = "unsupported_image"
TRUNCATED_IMAGE = "truncated_image"
CORRUPT_IMAGE = "corrupt_image"
DECOMPRESSION_BOMB = "decompression_bomb"
DARK_IMAGE = "dark_image"
EMPTY_CAPTION = "empty_caption"
SHORT_CAPTION = "short_caption"
NO_CAPTION = "no_caption"
EMPTY_AFTER_CLEANING = "empty_after_cleaning"  # --expand_abbreviations/--remove_* left nothing
SHORT_AFTER_CLEANING = "short_after_cleaning"  # ... or less than --min_caption_length
INVALID_UTF8 = "invalid_utf8"
MALFORMED_LINE = "malformed_line"
MALFORMED_JSON = "malformed_json"
DUPLICATE_ID = "duplicate_id"


class DataError(ValueError):
    """A bad record under strict mode. The message names the file and line (or record) and the reason."""


# Changes to records that are kept (counted with `DropCounter.change`, reported under "changed").
CONVERTED_CMYK = "converted_cmyk"  # a CMYK JPEG converted to RGB (PIL) before the pipeline


class DropCounter:
    """Counts dropped records by reason, so that nothing is lost silently, and changes made to kept records
    (caption cleaning, CMYK conversion) by kind, so that no change is silent either.

    Default mode skips and counts; `strict=True` raises `DataError` at the first drop instead. `where` should be
    "file:line" (or "file" for a record without a line), which both the error and the summary repeat.
    """

    def __init__(self, strict: bool = False, examples_per_reason: int = 5):
        self.strict = strict
        self.examples_per_reason = examples_per_reason
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)
        self.kept = 0
        self.changes: collections.Counter[str] = collections.Counter()
        self.change_examples: dict[str, list[str]] = collections.defaultdict(list)

    def change(self, kind: str, count: int = 1, example: str = "") -> None:
        """Counts `count` changes of `kind` made to kept data (e.g. "abbreviations_expanded")."""
        self.changes[kind] += count
        if example and len(self.change_examples[kind]) < self.examples_per_reason:
            self.change_examples[kind].append(example)

    def drop(self, reason: str, where: str, detail: str = "") -> None:
        message = f"{where}: {reason}" + (f" ({detail})" if detail else "")
        if self.strict:
            raise DataError(f"{message}. Fix or remove this record, or run without --strict to skip and count it.")
        self.counts[reason] += 1
        if len(self.examples[reason]) < self.examples_per_reason:
            self.examples[reason].append(message)

    @property
    def dropped(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> dict:
        return {
            "kept": self.kept,
            "dropped": self.dropped,
            "dropped_by_reason": dict(sorted(self.counts.items())),
            "examples": {reason: list(found) for reason, found in sorted(self.examples.items())},
            "changed": dict(sorted(self.changes.items())),
            "change_examples": {kind: list(found) for kind, found in sorted(self.change_examples.items())},
        }

    def report(self) -> str:
        """A human-readable report: what was kept, what was dropped and why (with a few examples each)."""
        lines = [f"kept {self.kept} records, dropped {self.dropped}"]
        for reason, count in sorted(self.counts.items(), key=lambda item: (-item[1], item[0])):
            lines.append(f"  {reason}: {count}")
            lines.extend(f"    e.g. {example}" for example in self.examples[reason][:3])
        for kind, count in sorted(self.changes.items()):
            lines.append(f"  changed: {kind}: {count}")
            lines.extend(f"    e.g. {example}" for example in self.change_examples[kind][:2])
        return "\n".join(lines)

    def write_json(self, path: str | Path) -> None:
        write_text(path, json.dumps(self.summary(), indent=2, ensure_ascii=False) + "\n")


def drop_duplicate_ids(records: list[Record], counter: DropCounter) -> list[Record]:
    """Keeps the first record of each id; later ones are dropped as `duplicate_id`."""
    seen: dict[str, str] = {}
    kept = []
    for record in records:
        if record.id in seen:
            counter.drop(DUPLICATE_ID, record.source or record.id, f"id {record.id} first seen at {seen[record.id]}")
            continue
        seen[record.id] = record.source or record.id
        kept.append(record)
    return kept
