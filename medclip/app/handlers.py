"""What the demo page does, without Streamlit: load a model and an index, search images by text, and for an
uploaded image rank candidate captions and zero-shot labels and find the most similar indexed images.

Every problem a user can cause (an empty query, an upload that is no image, a missing or mismatched index, a
model folder that cannot be loaded) raises :class:`InputError`, whose message the page shows as it is.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from medclip.data.image_checks import image_problem
from medclip.evaluation.roco_labels import MODALITIES
from medclip.evaluation.zeroshot import class_embeddings
from medclip.inference.embedder import Embedder, ImageError
from medclip.inference.index import EmbeddingIndex, IndexMismatchError
from medclip.inference.scores import match_probabilities

# Written like the demo's synthetic captions, which are written like ROCO's.
EXAMPLE_QUERIES = (
    "CT of the chest showing a large mass in the left upper lobe.",
    "Ultrasound of the pelvis showing a cyst.",
    "Plain radiograph of the chest with an effusion.",
    "MRI of the head with no abnormality.",
    "X-ray of the pelvis: a fracture in the right hip.",
)
DEFAULT_LABELS = MODALITIES
# The page embeds one query or one upload at a time, and padding a batch costs as much as filling it (measured
# on 2 CPU cores with a ViT-B/32 + BERT-base-sized model: 0.3-0.45 s a query at batch 1, 2.8 s at batch 8).
APP_BATCH_SIZE = 1


class InputError(ValueError):
    """A problem with what the user gave (or with the model and index); the message is shown as it is."""


@dataclasses.dataclass(frozen=True)
class ImageHit:
    rank: int  # 1 = best
    path: str
    caption: str  # "" where the index has none
    score: float  # cosine similarity to the query


@dataclasses.dataclass(frozen=True)
class ScoredText:
    text: str
    probability: float  # softmax over the candidates at the model's temperature; sigmoid per pair for SigLIP
    cosine: float


@dataclasses.dataclass(frozen=True)
class UploadResult:
    captions: list[ScoredText]  # best first
    labels: list[ScoredText]  # best first
    embedding: np.ndarray | None = dataclasses.field(default=None, repr=False)  # (dim,) of the uploaded image


def load_embedder(model_dir: str) -> Embedder:
    """The model, compiled for one text and one image, and the default labels embedded: the first query and
    upload are as fast as the next ones."""
    try:
        embedder = Embedder(model_dir, batch_size=APP_BATCH_SIZE)
    except (OSError, ValueError) as error:
        raise InputError(f"Cannot load the model `{model_dir}`: {error}. Train one (`make demo`) or start the "
                         "app with `--model` pointing to a saved medclip model folder.") from None
    embedder.embed_texts(["warm-up"])
    embedder.embed_images([_blank_png()])  # also imports and runs the decoding path of uploads
    _label_embeddings(embedder, tuple(DEFAULT_LABELS))
    return embedder


def _blank_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="PNG")
    return buffer.getvalue()


def load_index(index_path: str, embedder: Embedder) -> EmbeddingIndex:
    """The index, checked to be non-empty and made by this model."""
    try:
        index = EmbeddingIndex.load(index_path)
        index.check_model(embedder.fingerprint, embedder.dim)
    except FileNotFoundError:
        raise InputError(f"No embedding index at `{index_path}`. Build one with `medclip embed "
                         f"{embedder.model_dir} --data DATASET --out {index_path}` (the demo builds its own: "
                         "`make demo`), or start the app with `--index`.") from None
    except (ValueError, IndexMismatchError) as error:
        raise InputError(f"Cannot use the index `{index_path}`: {error}") from None
    if len(index) == 0:
        raise InputError(f"The index `{index_path}` holds no images; rebuild it with `medclip embed`.")
    return index


def search_images(embedder: Embedder, index: EmbeddingIndex, query: str, k: int) -> list[ImageHit]:
    """The k indexed images closest to the query, best first."""
    query = (query or "").strip()
    if not query:
        raise InputError(f'Empty query: type what to look for, e.g. "{EXAMPLE_QUERIES[0]}"')
    if k < 1:
        raise InputError(f"k must be at least 1, got {k}")
    top = index.search(embedder.embed_texts([query]), k)[0]
    return [ImageHit(rank, index.paths[i], index.captions[i], score) for rank, (i, score) in enumerate(top, 1)]


def similar_images(index: EmbeddingIndex, image_embed: np.ndarray, k: int) -> list[ImageHit]:
    """The k indexed images closest to an image embedding (an upload), best first; an indexed image uploaded
    again finds itself first (cosine 1)."""
    if k < 1:
        raise InputError(f"k must be at least 1, got {k}")
    top = index.search(np.asarray(image_embed)[None, :], k)[0]
    return [ImageHit(rank, index.paths[i], index.captions[i], score) for rank, (i, score) in enumerate(top, 1)]


def lines(text: str) -> list[str]:
    """The non-empty lines of a text box, stripped."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def embed_upload(embedder: Embedder, name: str, data: bytes) -> np.ndarray:
    """(dim,) embedding of uploaded bytes; InputError naming the file when they are not a usable image."""
    problem = image_problem(data)
    if problem is not None:
        raise InputError(f"`{name}` is not an image we can use ({problem[1]}). Upload a PNG, JPEG, GIF or BMP "
                         "radiology image.")
    try:
        return embedder.embed_images([data])[0]
    except ImageError as error:
        raise InputError(f"`{name}`: {error}. Upload a PNG, JPEG, GIF or BMP radiology image.") from None


def rank_texts(image_embed: np.ndarray, texts: Sequence[str], text_embeds: np.ndarray,
               logit_scale: float, logit_bias: float | None = None) -> list[ScoredText]:
    """Texts ranked by similarity to one image, with probabilities as the model computes them: softmax (CLIP), or
    sigmoid per pair for a model with a logit bias (SigLIP)."""
    cosines = np.asarray(text_embeds) @ np.asarray(image_embed)  # (n,)
    probabilities = match_probabilities(cosines, logit_scale, logit_bias)
    order = np.argsort(-cosines, kind="stable")
    return [ScoredText(texts[i], float(probabilities[i]), float(cosines[i])) for i in order]


@functools.lru_cache(maxsize=16)
def _label_embeddings(embedder: Embedder, labels: tuple[str, ...]) -> np.ndarray:
    return class_embeddings(labels, embedder.embed_texts)  # (K, dim), prompt-ensembled


def describe_upload(embedder: Embedder, name: str, data: bytes, captions: Sequence[str],
                    labels: Sequence[str] = DEFAULT_LABELS) -> UploadResult:
    """Candidate captions and zero-shot labels ranked for an uploaded image."""
    captions, labels = [c.strip() for c in captions if c.strip()], [x.strip() for x in labels if x.strip()]
    if not captions:
        raise InputError("No candidate captions: write at least one, one a line.")
    if len(set(labels)) < 2:
        raise InputError("Zero-shot labels: give at least two different labels to choose between, one a line.")
    image_embed = embed_upload(embedder, name, data)
    scale, bias = embedder.logit_scale(), embedder.logit_bias()
    return UploadResult(
        captions=rank_texts(image_embed, captions, embedder.embed_texts(captions), scale, bias),
        labels=rank_texts(image_embed, labels, _label_embeddings(embedder, tuple(labels)), scale, bias),
        embedding=image_embed,
    )


def index_mtime(index_path: str) -> float | None:
    """Part of the index's cache key, so that a rebuilt index is loaded again."""
    return os.path.getmtime(index_path) if os.path.isfile(index_path) else None
