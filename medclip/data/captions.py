"""Caption cleaning: unicode and whitespace normalisation, `b'...'` artifacts, minimum length."""

from __future__ import annotations

import ast
import re
import unicodedata

from medclip.data import records

DEFAULT_MIN_CAPTION_LENGTH = 10

_WHITESPACE = re.compile(r"\s+")
# Control and format characters (zero-width spaces, BOMs, soft hyphens) carry no meaning in a caption.
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf"})
# What `str(some_bytes)` leaves behind: b'...' or b"..." around the text.
_BYTES_REPR = re.compile(r"""^b(['"])(.*)\1$""", re.DOTALL)


def strip_bytes_repr(text: str) -> str:
    """Undoes `str(bytes)`: "b'CT\\xe2\\x80\\x99s'" -> "CT’s" (the original medclip JSON lines had these)."""
    match = _BYTES_REPR.match(text.strip())
    if not match:
        return text
    try:
        value = ast.literal_eval(text.strip())
        if isinstance(value, bytes):
            return value.decode("utf-8", errors="replace")
    except (ValueError, SyntaxError):
        pass
    return match.group(2)


def clean_caption(text: str) -> str:
    """Removes `b'...'` wrappers, normalises unicode (NFC), drops invisible characters, collapses whitespace."""
    text = strip_bytes_repr(text)
    text = unicodedata.normalize("NFC", text)
    text = "".join(" " if ch in "\t\n\r\f\v" else ch for ch in text)
    text = "".join(ch for ch in text if unicodedata.category(ch) not in _INVISIBLE_CATEGORIES)
    return _WHITESPACE.sub(" ", text).strip()


def caption_problem(text: str, min_length: int = DEFAULT_MIN_CAPTION_LENGTH) -> str | None:
    """The drop reason for an already cleaned caption, or None when it is usable."""
    if not text:
        return records.EMPTY_CAPTION
    if len(text) < min_length:
        return records.SHORT_CAPTION
    return None


def clean_captions(
    captions: list[str],
    where: str,
    counter: records.DropCounter,
    min_length: int = DEFAULT_MIN_CAPTION_LENGTH,
) -> list[str] | None:
    """Cleans a record's captions and keeps the usable ones.

    Returns None (and counts the record as dropped, under the reason of its first caption) when none is usable.
    Unusable captions of a record that keeps at least one are not counted: the record is not lost.
    """
    cleaned = [clean_caption(caption) for caption in captions]
    usable = [caption for caption in cleaned if caption_problem(caption, min_length) is None]
    if usable:
        return usable
    if not cleaned:
        counter.drop(records.NO_CAPTION, where)
        return None
    counter.drop(caption_problem(cleaned[0], min_length), where, repr(cleaned[0][:40]))
    return None
