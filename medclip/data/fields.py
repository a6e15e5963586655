"""Per-example extras of the training and evaluation batches: a second text, concept sets, whole-word flags, a
locked tower's cached features. Each is a `Field`, arrays with one row per record or per caption row that the
pipeline gathers for every element under the field's batch keys, so a new extra is a new provider here, not a new
argument of the pipeline (medclip.data.pipeline) or of the model call.

    fields = [second_text(items, tokenizer, 64, "keywords"), concept_field(items, vocab, 16)]
    train = make_train_dataset(items, captions, global_batch_size=256, seed=0, fields=fields)  # data.pipeline
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from medclip.data.records import Record


@dataclasses.dataclass(frozen=True)
class Field:
    """Arrays gathered for every example: `per_record[key][i]` for the example of record i, `per_caption[key][r]`
    for its caption row r (captions as `pipeline.tokenize_captions` lays them out). `valid` (per record): False
    where the record has no value (an image that did not decode when cached), and the example is skipped and
    counted as an undecodable image always is. `replaces_pixels`: the field stands in for the decoded image."""

    per_record: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    per_caption: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    valid: np.ndarray | None = None
    replaces_pixels: bool = False

    @property
    def keys(self) -> tuple[str, ...]:
        return (*self.per_record, *self.per_caption)


def check_fields(fields: Sequence[Field], num_records: int, num_captions: int) -> None:
    """Every array has a row per record (or caption row) and no two fields name the same batch key."""
    seen: set[str] = set()
    for field in fields:
        for rows, arrays, what in ((num_records, field.per_record, "record"),
                                   (num_captions, field.per_caption, "caption row")):
            for key, array in arrays.items():
                if len(array) != rows:
                    raise ValueError(f"field {key!r} has {len(array)} rows for {rows} (one per {what})")
        if field.valid is not None and len(field.valid) != num_records:
            raise ValueError(f"a field's validity has {len(field.valid)} rows for {num_records} records")
        repeated = seen.intersection(field.keys)
        if repeated:
            raise ValueError(f"two fields provide the batch key(s) {sorted(repeated)}")
        seen.update(field.keys)


def second_texts(items: list[Record], field: str) -> list[str]:
    """Each record's second text: its keywords or concepts joined by ", " (the concepts' names where the records
    carry them, as the CLIP-TF report feeds them), or another CSV column / JSON field (`Record.fields`); "" where
    a record has none. A field no record has is refused (a typo, most likely)."""
    if field == "concepts":
        return [", ".join(record.concept_names or record.concepts) for record in items]
    if field == "keywords":
        return [", ".join(record.keywords) for record in items]
    if items and not any(field in record.fields for record in items):
        raise ValueError(f"no record has a {field!r} field (--second_text_field): use keywords, concepts, or a "
                         f"CSV column / JSON field of the data (e.g. {sorted(items[0].fields)[:8]})")
    return [record.fields.get(field, "") for record in items]


def tokenize(tokenizer, texts: list[str], max_seq_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), (len(texts), max_seq_length) int32: one call of the (Rust) fast tokenizer."""
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=max_seq_length,
                        return_attention_mask=True, return_token_type_ids=False, return_tensors="np")
    return encoded["input_ids"].astype(np.int32), encoded["attention_mask"].astype(np.int32)


def second_text(items: list[Record], tokenizer, max_seq_length: int, field: str) -> Field:
    """--second_text_field: "second_input_ids" / "second_attention_mask", one row per record (`second_texts`)."""
    ids, mask = tokenize(tokenizer, second_texts(items, field), max_seq_length)
    return Field(per_record={"second_input_ids": ids, "second_attention_mask": mask})


def word_start(starts: np.ndarray) -> Field:
    """--mlm_masking whole_word: "word_start", 1 where a token starts a word (medclip.training.mlm.word_starts)."""
    return Field(per_caption={"word_start": starts})


def cached_text(pooled: np.ndarray) -> Field:
    """A locked text tower's pooled output of every caption row (medclip.training.text_cache): "text_pooled"."""
    return Field(per_caption={"text_pooled": pooled})


@dataclasses.dataclass(frozen=True)
class ImageFeatures:
    """A locked image tower's pooled output for every record (medclip.training.image_cache)."""

    features: np.ndarray  # (num_records, hidden) float32
    valid: np.ndarray  # (num_records,) bool: False where the image could not be decoded (zeros in features)

    def field(self) -> Field:
        """"image_pooled" in place of the pixels: the pipeline decodes no images and the step skips the tower."""
        return Field(per_record={"image_pooled": self.features}, valid=self.valid, replaces_pixels=True)
