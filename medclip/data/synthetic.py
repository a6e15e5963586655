"""Synthetic radiology-like image-caption pairs whose captions really describe the image.

Each pair draws a modality (CT, MRI, X-ray, ultrasound: distinct textures and intensities), a body region (head,
chest, abdomen, pelvis: distinct silhouettes and inner structures), and a finding (mass: bright blob, cyst: dark
round blob, fracture: a bone bar broken by a gap, effusion: a flat-topped fluid pool; or none) with its size and
location (patient's left/right x upper/lower). Locations follow the radiological convention: the patient's left is
on the image's right. The caption is written from those attributes with several templates, e.g.
"Axial CT of the chest showing a large mass in the left upper lobe."

Everything is deterministic from the seed. A tiny CLIP learns it in a few hundred steps at 64 px, so the demo and
the end-to-end tests can show learning without any download. `write_synthetic_dataset` writes real image files
plus JSON lines, so the demo goes through the same file path as ROCO; `write_synthetic_tokenizer` writes a
WordPiece vocabulary covering every caption and returns a `BertTokenizerFast` (no hub needed).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

from medclip.data.records import Record
from medclip.data.sources import jsonl

MODALITIES = ("CT", "MRI", "X-ray", "ultrasound")
REGIONS = ("head", "chest", "abdomen", "pelvis")
FINDINGS = ("none", "mass", "cyst", "fracture", "effusion")
SIDES = ("left", "right")  # the patient's side
LEVELS = ("upper", "lower")
SIZES = ("small", "large")

_MODALITY_NAMES = {
    "CT": ("Axial CT", "CT scan", "Contrast-enhanced CT", "Computed tomography image"),
    "MRI": ("Axial T2-weighted MRI", "MRI", "Magnetic resonance image", "T1-weighted MR image"),
    "X-ray": ("Plain radiograph", "X-ray", "Frontal radiograph"),
    "ultrasound": ("Ultrasound", "Sonographic image", "Ultrasound image"),
}
_PARTS = {  # region -> (upper part, lower part)
    "head": ("frontal lobe", "occipital lobe"),
    "chest": ("upper lobe", "lower lobe"),
    "abdomen": ("upper quadrant", "lower quadrant"),
    "pelvis": ("iliac wing", "hip"),
}
_FINDING_NAMES = {
    "mass": ("mass", "solid mass", "tumour"),
    "cyst": ("cyst", "cystic lesion", "fluid-filled cyst"),
    "fracture": ("fracture", "fracture line"),
    "effusion": ("effusion", "fluid collection"),
}
_TEMPLATES = (
    "{Modality} of the {region} showing {finding} in the {side} {part}.",
    "{Modality} of the {region}: {finding} in the {side} {part}.",
    "There is {finding} in the {side} {part} on this {modality} of the {region}.",
    "{Finding} in the {side} {part}, seen on {modality} of the {region}.",
)
_NORMAL_TEMPLATES = (
    "{Modality} of the {region} with no abnormality.",
    "Normal {modality} of the {region}.",
    "{Modality} of the {region} showing no focal lesion.",
)
# Grey levels in [0, 1] per modality: background, tissue, bone, lung/air, fluid, mass, cyst.
_INTENSITY = {
    "CT": dict(background=0.02, tissue=0.45, bone=0.95, air=0.12, fluid=0.58, mass=0.82, cyst=0.22),
    "MRI": dict(background=0.03, tissue=0.5, bone=0.12, air=0.06, fluid=0.9, mass=0.85, cyst=0.1),
    "X-ray": dict(background=0.06, tissue=0.38, bone=0.92, air=0.16, fluid=0.65, mass=0.78, cyst=0.22),
    "ultrasound": dict(background=0.0, tissue=0.42, bone=0.95, air=0.2, fluid=0.04, mass=0.8, cyst=0.02),
}


@dataclasses.dataclass(frozen=True)
class Attributes:
    modality: str
    region: str
    finding: str
    side: str
    level: str
    size: str


def sample_attributes(rng: np.random.Generator) -> Attributes:
    return Attributes(
        modality=str(rng.choice(MODALITIES)),
        region=str(rng.choice(REGIONS)),
        finding=str(rng.choice(FINDINGS, p=(0.2, 0.2, 0.2, 0.2, 0.2))),
        side=str(rng.choice(SIDES)),
        level=str(rng.choice(LEVELS)),
        size=str(rng.choice(SIZES)),
    )


def caption_for(attributes: Attributes, rng: np.random.Generator) -> str:
    """A caption that states the modality, region and (when present) the finding, its size and location."""
    modality = str(rng.choice(_MODALITY_NAMES[attributes.modality]))
    words = {"Modality": modality, "modality": modality if modality.isupper() else _lower_first(modality),
             "region": attributes.region}
    if attributes.finding == "none":
        return str(rng.choice(_NORMAL_TEMPLATES)).format(**words)
    name = str(rng.choice(_FINDING_NAMES[attributes.finding]))
    finding = f"a {attributes.size} {name}"
    part = _PARTS[attributes.region][LEVELS.index(attributes.level)]
    words.update(finding=finding, Finding=finding[0].upper() + finding[1:], side=attributes.side, part=part)
    return str(rng.choice(_TEMPLATES)).format(**words)


def _lower_first(text: str) -> str:
    # "Axial CT" -> "axial CT", "MRI" stays, "X-ray" -> "x-ray"
    return text[0].lower() + text[1:] if len(text) > 1 and not text[1].isupper() else text


def render(attributes: Attributes, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """The grayscale image, uint8 (size, size)."""
    tone = _INTENSITY[attributes.modality]
    y, x = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    cy, cx = rng.uniform(-0.04, 0.04, 2)
    scale = rng.uniform(0.92, 1.05)
    body, image = _anatomy(attributes.region, tone, (y - cy) / scale, (x - cx) / scale)
    if attributes.modality == "X-ray":  # a projection fills the frame
        image = np.where(body, image, tone["background"] + 0.1 * (y + 1))
    else:
        image = np.where(body, image, tone["background"])
    _draw_finding(image, attributes, tone, rng, y, x, body)
    image = _texture(image, attributes.modality, rng, y, x)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def _ellipse(y, x, cy, cx, ry, rx):
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1


def _anatomy(region: str, tone: dict, y, x):
    """(body mask, image with the region's silhouette and inner structures)."""
    image = np.full(y.shape, tone["tissue"])
    if region == "head":
        body = _ellipse(y, x, 0, 0, 0.85, 0.72)
        skull = body & ~_ellipse(y, x, 0, 0, 0.76, 0.63)
        image[skull] = tone["bone"]
        image[_ellipse(y, x, 0.05, 0, 0.18, 0.05)] = tone["fluid"]  # ventricles
    elif region == "chest":
        body = _ellipse(y, x, 0, 0, 0.7, 0.95)
        image[_ellipse(y, x, -0.02, -0.45, 0.5, 0.3) | _ellipse(y, x, -0.02, 0.45, 0.5, 0.3)] = tone["air"]
        image[_ellipse(y, x, 0.45, 0, 0.13, 0.13)] = tone["bone"]  # spine
        image[_ellipse(y, x, 0.05, 0.08, 0.22, 0.18)] = tone["tissue"] + 0.08  # heart
    elif region == "abdomen":
        body = _ellipse(y, x, 0, 0, 0.78, 0.9)
        image[_ellipse(y, x, 0.5, 0, 0.12, 0.12)] = tone["bone"]  # spine
        image[_ellipse(y, x, -0.25, -0.4, 0.3, 0.3)] = tone["tissue"] + 0.1  # liver (patient's right)
        image[_ellipse(y, x, 0.15, 0.45, 0.14, 0.1) | _ellipse(y, x, 0.15, -0.45, 0.14, 0.1)] = tone["tissue"] + 0.15
    else:  # pelvis
        body = _ellipse(y, x, 0, 0, 0.75, 0.95)
        wings = _ellipse(y, x, -0.3, -0.45, 0.25, 0.35) | _ellipse(y, x, -0.3, 0.45, 0.25, 0.35)
        hips = _ellipse(y, x, 0.35, -0.55, 0.17, 0.17) | _ellipse(y, x, 0.35, 0.55, 0.17, 0.17)
        image[wings | hips] = tone["bone"]
        image[_ellipse(y, x, 0.05, 0, 0.12, 0.2)] = tone["fluid"]  # bladder
    return body, image


def _draw_finding(image, attributes: Attributes, tone: dict, rng, y, x, body) -> None:
    if attributes.finding == "none":
        return
    # Patient's left is on the image's right.
    fx = (0.42 if attributes.side == "left" else -0.42) + rng.uniform(-0.06, 0.06)
    fy = (-0.32 if attributes.level == "upper" else 0.32) + rng.uniform(-0.06, 0.06)
    radius = rng.uniform(0.12, 0.15) if attributes.size == "small" else rng.uniform(0.2, 0.25)
    # Masses and cysts get a contrasting rim so they stand out on any anatomy underneath.
    inner = _ellipse(y, x, fy, fx, radius, radius * rng.uniform(0.85, 1.15))
    rim = _ellipse(y, x, fy, fx, radius + 0.06, radius + 0.06) & ~inner
    if attributes.finding == "mass":
        image[rim] = tone["air"]
        image[inner] = tone["mass"] + rng.normal(0, 0.04, inner.sum())
    elif attributes.finding == "cyst":
        image[rim] = tone["mass"]
        image[inner] = tone["cyst"]
    elif attributes.finding == "fracture":
        length = radius + 0.12  # half-length
        bar = (np.abs(y - fy) <= 0.07) & (np.abs(x - fx) <= length) & body
        image[bar] = tone["bone"]
        gap = np.abs((x - fx) + 0.5 * (y - fy)) <= 0.045  # an oblique break through the bar
        image[bar & gap] = tone["tissue"] if tone["bone"] > tone["tissue"] else tone["fluid"]
    else:  # effusion: a pool with a flat (fluid-level) top
        pool = _ellipse(y, x, fy + radius * 0.5, fx, radius * 1.1, radius * 1.8) & (y >= fy) & body
        image[pool] = tone["fluid"]


def _smooth(field, passes: int = 2):
    for _ in range(passes):
        neighbours = np.roll(field, 1, 0) + np.roll(field, -1, 0) + np.roll(field, 1, 1) + np.roll(field, -1, 1)
        field = (field + neighbours) / 5
    return field


def _texture(image, modality: str, rng, y, x):
    shape = image.shape
    if modality == "CT":
        image = np.where(x**2 + y**2 <= 1.0, image, 0.0)  # round field of view
        return image + rng.normal(0, 0.03, shape)
    if modality == "MRI":
        bias = 1 + 0.25 * np.sin(rng.uniform(1, 2) * x + rng.uniform(0, 6)) * np.cos(rng.uniform(1, 2) * y)
        return _smooth(image, 1) * bias + np.abs(rng.normal(0, 0.025, shape))
    if modality == "X-ray":
        return _smooth(image, 2) * (0.9 + 0.15 * (1 - y) / 2) + rng.normal(0, 0.015, shape)
    # ultrasound: a fan from the top, multiplicative speckle, darker with depth
    angle = np.arctan2(x, y + 1.2)
    radius = np.sqrt(x**2 + (y + 1.2) ** 2)
    fan = (np.abs(angle) <= 0.6) & (radius >= 0.5) & (radius <= 2.3)
    speckle = _smooth(rng.gamma(2.0, 0.5, shape), 1)
    return np.where(fan, image * speckle * (1.15 - 0.3 * (y + 1) / 2), 0.0)


def make_pair(seed: int, index: int, size: int = 64) -> tuple[np.ndarray, str, Attributes]:
    """(uint8 image (size, size), caption, attributes) for pair `index` of dataset `seed`."""
    rng = np.random.default_rng([seed, index])
    attributes = sample_attributes(rng)
    return render(attributes, rng, size), caption_for(attributes, rng), attributes


def write_synthetic_dataset(out_dir: str | Path, n: int, seed: int = 0, image_size: int = 64,
                            image_format: str = "png", name: str = "train", captions_per_image: int = 1) -> Path:
    """Writes `n` pairs as image files (`images/{name}-{i}.png`) plus `{name}.jsonl`; returns the JSONL path."""
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    suffix = {"png": ".png", "jpeg": ".jpg", "jpg": ".jpg"}[image_format.lower()]
    items = []
    for index in range(n):
        rng = np.random.default_rng([seed, index])
        attributes = sample_attributes(rng)
        pixels = render(attributes, rng, image_size)
        captions = [caption_for(attributes, rng) for _ in range(captions_per_image)]
        path = image_dir / f"{name}-{index:06d}{suffix}"
        Image.fromarray(pixels).save(path, **({"quality": 95} if suffix == ".jpg" else {}))
        items.append(Record(id=f"synthetic-{seed}-{index}", image=str(path), captions=captions,
                            keywords=[attributes.modality, attributes.region, attributes.finding]))
    return jsonl.write_jsonl(items, out_dir / f"{name}.jsonl")


def all_caption_words() -> list[str]:
    """Every piece of text a synthetic caption can contain."""
    texts = [t for names in _MODALITY_NAMES.values() for t in names]
    texts += list(REGIONS) + list(SIDES) + list(SIZES) + [p for parts in _PARTS.values() for p in parts]
    texts += [t for names in _FINDING_NAMES.values() for t in names]
    texts += list(_TEMPLATES) + list(_NORMAL_TEMPLATES)
    return texts


def write_synthetic_tokenizer(out_dir: str | Path):
    """A WordPiece vocabulary covering every synthetic caption (plus single characters, so other text splits into
    pieces instead of [UNK]); saved with `save_pretrained` in `out_dir` and returned as a `BertTokenizerFast`."""
    from tokenizers.pre_tokenizers import BertPreTokenizer
    from transformers import BertTokenizerFast

    pre_tokenizer = BertPreTokenizer()
    words = set()
    for text in all_caption_words():
        words.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(text.lower()) if "{" not in piece)
    words -= {"{", "}"}
    characters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    punctuation = list(".,:;-()'\"/%+")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(words)
    vocab += [c for c in characters + punctuation if c not in words] + [f"##{c}" for c in characters]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_file = out_dir / "vocab.txt"
    vocab_file.write_text("\n".join(dict.fromkeys(vocab)) + "\n", encoding="utf-8")
    # transformers 5 takes the vocabulary file as `vocab` (a `vocab_file=` keyword is silently ignored).
    tokenizer = BertTokenizerFast(vocab=str(vocab_file), do_lower_case=True)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer
