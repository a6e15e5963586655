"""ROCO in the raw layout its fetch script leaves:

    data/{train,validation,test}/{radiology,non-radiology}/
        captions.txt   ROCO_ID<TAB> caption
        keywords.txt   ROCO_ID<TAB><TAB>keyword<TAB>...
        cuis.txt       ROCO_ID<TAB><TAB>UMLS CUI<TAB>...
        semtypes.txt   ROCO_ID<TAB><TAB>T-code<TAB>name<TAB>...  (the CUIs' UMLS semantic types)
        licences.txt, dlinks.txt (not needed for training)
        images/ROCO_ID.jpg

One record per line of captions.txt: concepts are the CUIs, keywords the keywords, semantic types the T-codes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from medclip.data import captions as caption_cleaning
from medclip.data import records
from medclip.data.records import DropCounter, Record
from medclip.data.sources import base
from medclip.storage import as_path

SPLITS = ("train", "validation", "test")
_SEMTYPE = re.compile(r"T\d{3}")
SUBSETS = ("radiology", "non-radiology")


def subset_dir(root: str | Path, split: str, subset: str) -> Path:
    """Finds `{split}/{subset}` under `root`, which may be the repository, its `data/` folder or the subset itself."""
    root = as_path(root)
    for candidate in (root / "data" / split / subset, root / split / subset, root):
        if (candidate / "captions.txt").is_file():
            return candidate
    raise FileNotFoundError(
        f"no ROCO captions.txt for {split}/{subset} under {root}: expected {root}/data/{split}/{subset}/captions.txt "
        "(the layout ROCO's fetch script leaves)"
    )


def available_splits(root: str | Path, subsets=("radiology",)) -> list[str]:
    """The splits under `root` (the repository or its `data/` folder) that have every subset."""
    root = as_path(root)
    data = root / "data" if (root / "data").is_dir() else root
    return [split for split in SPLITS if all((data / split / subset / "captions.txt").is_file() for subset in subsets)]


def _tab_lists(path: Path) -> dict[str, list[str]]:
    """ROCO_ID -> the non-empty tab-separated fields after it (keywords.txt, cuis.txt); {} when the file is absent."""
    if not path.is_file():
        return {}
    table = {}
    for _, line in base.read_lines(path, counter=None):
        fields = line.split("\t")
        table[fields[0].strip()] = [field.strip() for field in fields[1:] if field.strip()]
    return table


def read_subset(
    directory: Path, counter: DropCounter, min_caption_length: int = caption_cleaning.DEFAULT_MIN_CAPTION_LENGTH
) -> list[Record]:
    """The records of one `{split}/{subset}` folder, captions cleaned; images are not checked here."""
    keywords = _tab_lists(directory / "keywords.txt")
    concepts = _tab_lists(directory / "cuis.txt")
    # semtypes.txt alternates code and name; the codes are the types
    semantic_types = {key: [f for f in fields if _SEMTYPE.fullmatch(f)]
                      for key, fields in _tab_lists(directory / "semtypes.txt").items()}
    captions_path = directory / "captions.txt"
    items = []
    for number, line in base.read_lines(captions_path, counter):
        where = f"{captions_path}:{number}"
        roco_id, tab, caption = line.partition("\t")
        roco_id = roco_id.strip()
        if not tab or not roco_id:
            counter.drop(records.MALFORMED_LINE, where, "expected ROCO_ID<TAB>caption")
            continue
        cleaned = caption_cleaning.clean_captions([caption], where, counter, min_caption_length)
        if cleaned is None:
            continue
        items.append(Record(
            id=roco_id,
            image=str(directory / "images" / f"{roco_id}.jpg"),
            captions=cleaned,
            concepts=concepts.get(roco_id, []),
            keywords=keywords.get(roco_id, []),
            semantic_types=semantic_types.get(roco_id, []),
            source=where,
        ))
    return items


def load_roco(
    root: str | Path,
    split: str = "train",
    subsets: tuple[str, ...] = ("radiology",),
    *,
    counter: DropCounter | None = None,
    **options: Any,
) -> list[Record]:
    """Loads one split of ROCO. Drops are counted in `counter` (a new one, logged at the end, if None);
    `options` are `base.LoadOptions`."""

    def read(counter: DropCounter, min_caption_length: int) -> list[Record]:
        return [record for subset in subsets
                for record in read_subset(subset_dir(root, split, subset), counter, min_caption_length)]

    return base.load(f"ROCO {split} {'+'.join(subsets)}", read, counter, options)
