"""What every source shares: reading text lines without trusting their encoding, and the common finishing steps."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from medclip.data import captions as caption_cleaning
from medclip.data import image_checks, records
from medclip.data.text_cleaning import TextCleaning, clean_records
from medclip.data.records import DropCounter, Record
from medclip.storage import open_file

log = logging.getLogger(__name__)


def read_lines(path: str | Path, counter: DropCounter | None) -> Iterator[tuple[int, str]]:
    """(line number, text) for each non-blank line, decoded as UTF-8 line by line.

    A line that is not valid UTF-8 is counted as `invalid_utf8` and skipped when `counter` is given; without a
    counter (auxiliary files such as keywords.txt) undecodable bytes become U+FFFD and the line is kept.
    """
    with open_file(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue
            if counter is None:
                yield number, raw.decode("utf-8", errors="replace")
                continue
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                bad_bytes = raw[error.start : error.start + 4]
                counter.drop(records.INVALID_UTF8, f"{path}:{number}", f"byte {error.start}: {bad_bytes!r}")


def finish(
    items: list[Record],
    counter: DropCounter,
    *,
    check_images: bool = True,
    max_pixels: int = image_checks.DEFAULT_MAX_PIXELS,
    verify_decode: bool = False,
    min_mean_intensity: float | None = None,
    text_cleaning: TextCleaning | None = None,
    min_caption_length: int = caption_cleaning.DEFAULT_MIN_CAPTION_LENGTH,
) -> list[Record]:
    """Drops duplicate ids, captions that `text_cleaning` (when given) empties or shortens under
    `min_caption_length`, and bad images; counts what is kept, and returns the usable records."""
    items = records.drop_duplicate_ids(items, counter)
    if text_cleaning is not None and text_cleaning.active:
        items = clean_records(items, text_cleaning, counter, min_caption_length)
    if check_images:
        items = image_checks.check_images(items, counter, max_pixels)
    if verify_decode or min_mean_intensity is not None:
        items = image_checks.verify_decode(items, counter, min_mean_intensity)
    counter.kept += len(items)
    return items


def log_report(name: str, counter: DropCounter) -> None:
    level = logging.WARNING if counter.dropped else logging.INFO
    log.log(level, "%s: %s", name, counter.report())


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """Keyword options every `load_*` takes besides its source's own."""

    strict: bool = False  # stop at the first bad record (file:line in the error) instead of counting it
    min_caption_length: int = caption_cleaning.DEFAULT_MIN_CAPTION_LENGTH
    check_images: bool = True
    max_pixels: int = image_checks.DEFAULT_MAX_PIXELS
    verify_decode: bool = False
    min_mean_intensity: float | None = None  # drop near-black images (mean 0-255 under this); decodes every image
    text_cleaning: TextCleaning | None = None  # abbreviations, stop words, ... (medclip.data.text_cleaning)


def load(name: str, read: Callable[[DropCounter, int], list[Record]], counter: DropCounter | None,
         options: dict[str, Any]) -> list[Record]:
    """What every `load_*` does around its reader: `read(counter, min_caption_length)`, then duplicate ids and
    bad images dropped; the report is logged when the caller brought no counter of its own."""
    opts = LoadOptions(**options)  # an unknown option fails here, naming it
    owns_counter = counter is None
    counter = counter or DropCounter(strict=opts.strict)
    items = finish(read(counter, opts.min_caption_length), counter, check_images=opts.check_images,
                   max_pixels=opts.max_pixels, verify_decode=opts.verify_decode,
                   min_mean_intensity=opts.min_mean_intensity, text_cleaning=opts.text_cleaning,
                   min_caption_length=opts.min_caption_length)
    if owns_counter:
        log_report(name, counter)
    return items
