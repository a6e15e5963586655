"""Per-image labels for ROCO zero-shot tasks: the raw concept files and imaging-modality classes.

ROCO ships one line per image in ``cuis.txt`` / ``keywords.txt`` / ``captions.txt``:
``ROCO_ID<TAB>[<TAB>]field<TAB>field...``. :func:`read_roco_lists` turns such a file into lists of
concepts, ready for :func:`medclip.evaluation.zeroshot.build_concept_task`.

Modality classes. ROCO's CUIs are extracted automatically from captions and miss the modality often
(a "chest x-ray" caption without the plain x-ray CUI is common), so :func:`modality_labels` takes the
union of two cheap signals:

* CUIs: the modality concepts in :data:`ROCO_MODALITY_CUIS`;
* keywords: the regular expressions in :data:`ROCO_MODALITY_PATTERNS`, searched (lower-cased) in the
  caption and in ROCO's keyword list (which holds stemmed tokens such as ``xray``, ``tomography``).

It is a heuristic: an image can get several modalities ("CT angiography" is both computed tomography and
angiography, "PET/CT" both PET and CT), and a caption that names no modality gets none. Some words are
deliberately not mapped: bare "tomography" (CT, PET, OCT or tomosynthesis), "MR" alone (also mitral
regurgitation), "MRA" as angiography (also MR arthrography), "echo" alone (also spin/gradient echo MRI).
A few common abbreviations (CXR, AXR, USG, EUS, TTE/TEE) and French terms (TDM, IRM) are matched.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

COMPUTED_TOMOGRAPHY = "computed tomography"
MRI = "magnetic resonance imaging"
PLAIN_XRAY = "plain x-ray"
ULTRASOUND = "ultrasound"
ANGIOGRAPHY = "angiography"
PET = "positron emission tomography"
MAMMOGRAPHY = "mammography"
FLUOROSCOPY = "fluoroscopy"

MODALITIES = (COMPUTED_TOMOGRAPHY, MRI, PLAIN_XRAY, ULTRASOUND, ANGIOGRAPHY, PET, MAMMOGRAPHY, FLUOROSCOPY)

# UMLS CUIs of imaging modalities as they appear in ROCO's cuis.txt (the ImageCLEF caption tasks use the
# same ones for modality).
ROCO_MODALITY_CUIS = {
    "C0040405": COMPUTED_TOMOGRAPHY,  # X-Ray Computed Tomography
    "C0024485": MRI,  # Magnetic Resonance Imaging
    "C1306645": PLAIN_XRAY,  # Plain x-ray
    "C0041618": ULTRASOUND,  # Ultrasonography
    "C0013516": ULTRASOUND,  # Echocardiography
    "C0002978": ANGIOGRAPHY,  # angiogram
    "C0032743": PET,  # Positron-Emission Tomography
    "C0024671": MAMMOGRAPHY,  # Mammography
    "C0016356": FLUOROSCOPY,  # Fluoroscopy
}

ROCO_MODALITY_PATTERNS = {
    COMPUTED_TOMOGRAPHY: (
        r"\bct\b",
        r"\bct[- ]?scans?\b",
        r"\b(?:hr|mdct|ce|cb)ct\b",
        r"\bcta\b",
        r"\bcomput(?:ed|eri[sz]ed|er)[- ]?tomogra",  # tomography, tomographic, tomogram
        r"\btdm\b",  # French captions: tomodensitometrie
    ),
    MRI: (
        r"\bmri\b",
        r"\bmra\b",
        r"\bmrcp\b",
        r"magnetic resonance",
        r"\bmr (?:image|imaging|scan|angiograph|venograph|examination)",
        r"\bt[12][- ]?weighted",
        r"\bt[12]wi?\b",
        r"\bflair\b",
        r"\bstir\b",
        r"\bspin[- ]echo\b",
        r"\bdiffusion[- ]weighted",
        r"\birm\b",  # French captions
    ),
    PLAIN_XRAY: (
        r"\bx[- ]?rays?\b",
        r"\b[ac]?xr\b",  # XR, CXR (chest), AXR (abdominal)
        r"\bradio-?graph(?:s|y)?\b",
        r"\broentgenogra",
        r"\bplain films?\b",
        r"\borthopantomogra",
        r"\bopg\b",
    ),
    ULTRASOUND: (
        r"ultrasound",
        r"sonogra",  # sonogram, ultrasonography, endosonography
        r"\bechogra",
        r"echocardiogra",
        r"\bdoppler\b",
        r"\b(?:usg|eus|tte|tee)\b",  # ultrasonography, endoscopic, transthoracic/transoesophageal echo
        r"\bparasternal\b",
    ),
    ANGIOGRAPHY: (
        r"(?<!chol)angiogra",  # not cholangiography (bile ducts)
        r"\barteriogra",
        r"\bvenogra",
        r"\bphlebogra",
        r"\bdsa\b",
        r"\bcta\b",
    ),
    PET: (r"\bpet\b", r"\bpetct\b", r"positron emission"),
    MAMMOGRAPHY: (r"mammogra",),
    FLUOROSCOPY: (r"fluoroscop",),
}

_COMPILED = {
    modality: re.compile("|".join(patterns)) for modality, patterns in ROCO_MODALITY_PATTERNS.items()
}


def modality_labels(
    caption: str = "", keywords: Iterable[str] = (), cuis: Iterable[str] = ()
) -> set[str]:
    """Readable modality classes of one image from its caption, ROCO keywords and CUIs (any may be empty)."""
    labels = {ROCO_MODALITY_CUIS[c] for c in cuis if c in ROCO_MODALITY_CUIS}
    text = " ; ".join([caption, *keywords]).lower()
    labels.update(modality for modality, pattern in _COMPILED.items() if pattern.search(text))
    return labels


def read_roco_lists(path: str | Path) -> dict[str, list[str]]:
    """``{ROCO_ID: [field, ...]}`` from a ROCO per-image file, in file order; empty fields dropped."""
    path = Path(path)
    lists: dict[str, list[str]] = {}
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            image_id, *fields = line.rstrip("\n").split("\t")
            image_id = image_id.strip()
            if not image_id or image_id in lists:
                problem = "has no image id" if not image_id else f"repeats image id {image_id}"
                raise ValueError(f"{path}:{line_number} {problem}; expected 'ROCO_ID<TAB>field<TAB>...'")
            lists[image_id] = [field.strip() for field in fields if field.strip()]
    return lists
