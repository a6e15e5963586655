"""Zero-shot image classification with text prompts, as in the CLIP-on-ROCO report.

Each class is described by several prompts ("a radiology image showing {}.", "a {} scan.", ...). A class
embedding is the mean of its L2-normalised prompt embeddings, renormalised (CLIP's prompt ensembling);
an image's class scores are cosine similarities to those. The text encoder is any
``encode_text(list[str]) -> (n, dim) array`` callable, so this module works before the model exists.

Labels come from ROCO's per-image concept lists (``cuis.txt``, ``keywords.txt``, or the modality labels
of :mod:`medclip.evaluation.roco_labels`). Images can carry several labels, so two kinds of scores:

* single-label accuracy (``acc``): top-1 on the images that have exactly one of the K labels;
* multi-label scores on all images having at least one label: ``top1_in_labels`` (the top-scoring class is
  one of the image's labels) and ``mAP`` (mean over classes of average precision).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from medclip.evaluation.prompts import RADIOLOGY_TEMPLATES

EncodeText = Callable[[list[str]], np.ndarray]

DEFAULT_TEMPLATES = RADIOLOGY_TEMPLATES  # other sets: medclip.evaluation.prompts
K_VALUES = (2, 5, 10, 30)


@dataclasses.dataclass(frozen=True)
class ConceptTask:
    """A K-class task over the images that have at least one of the K concepts."""

    concepts: tuple[str, ...]  # the K labels, most frequent first
    class_names: tuple[str, ...]  # readable names put into the prompts, same order
    image_indices: np.ndarray  # (n,) rows of the original image list that are in the task
    targets: np.ndarray  # (n, K) bool, targets[i, c]: image i has concept c

    @property
    def single_label(self) -> np.ndarray:
        """(n,) bool: images with exactly one of the K concepts (scored by top-1 accuracy)."""
        return self.targets.sum(axis=1) == 1


def class_embeddings(
    class_names: Sequence[str],
    encode_text: EncodeText,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
) -> np.ndarray:
    """(K, D) unit class embeddings: mean of the normalised prompt embeddings, renormalised.

    All K x T prompts go to ``encode_text`` in one call (class-major order); batch inside the callable if
    the encoder needs it. Prompt embeddings are renormalised here too, so an encoder that forgets to
    normalise does not weight some templates more than others.
    """
    if not class_names:
        raise ValueError("no class names given")
    if not templates:
        raise ValueError("no prompt templates given")
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(f"prompt template {template!r} must contain '{{}}' exactly once")
    prompts = [template.format(name) for name in class_names for template in templates]
    embeds = np.asarray(encode_text(prompts), dtype=np.float32)
    if embeds.ndim != 2 or len(embeds) != len(prompts):
        raise ValueError(
            f"encode_text returned shape {embeds.shape} for {len(prompts)} prompts; "
            "expected (n_prompts, dim)"
        )
    per_class = _normalise(embeds).reshape(len(class_names), len(templates), -1)  # (K, T, D)
    return _normalise(per_class.mean(axis=1))


def zero_shot_scores(image_embeds: np.ndarray, class_embeds: np.ndarray) -> np.ndarray:
    """(N, K) cosine similarities between normalised image and class embeddings."""
    image_embeds = np.asarray(image_embeds, dtype=np.float32)
    class_embeds = np.asarray(class_embeds, dtype=np.float32)
    if image_embeds.ndim != 2 or class_embeds.ndim != 2 or image_embeds.shape[1] != class_embeds.shape[1]:
        raise ValueError(
            f"need (N, D) images and (K, D) classes, got {image_embeds.shape} and {class_embeds.shape}"
        )
    return image_embeds @ class_embeds.T


def top1_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose highest score is at ``labels`` (ties go to the lower class index)."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} score rows but {len(labels)} labels")
    if len(labels) == 0:
        return float("nan")
    return float(np.mean(np.argmax(scores, axis=1) == labels))


def average_precision(scores: np.ndarray, is_positive: np.ndarray) -> float:
    """Average precision of one ranking, with tied scores handled as one threshold.

    AP = sum over distinct score thresholds of (recall step) x precision, the same definition as
    ``sklearn.metrics.average_precision_score``, so tied scores give one well-defined value instead of
    depending on sort order. NaN when there is no positive.
    """
    scores = np.asarray(scores, dtype=np.float64)
    is_positive = np.asarray(is_positive, dtype=bool)
    n_positive = int(is_positive.sum())
    if n_positive == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    sorted_scores, hits = scores[order], is_positive[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(sorted_scores) - 1]
    true_pos = np.cumsum(hits)[last_of_tie]
    precision = true_pos / (last_of_tie + 1)
    recall_step = np.diff(np.r_[0, true_pos]) / n_positive
    return float(np.sum(recall_step * precision))


def multilabel_metrics(scores: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """``mAP`` (macro over classes that have a positive) and ``top1_in_labels`` for (N, K) inputs."""
    scores, targets = np.asarray(scores), np.asarray(targets, dtype=bool)
    if scores.shape != targets.shape:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} differ in shape")
    aps = [average_precision(scores[:, c], targets[:, c]) for c in range(targets.shape[1])]
    aps = [ap for ap in aps if not np.isnan(ap)]
    top1 = np.argmax(scores, axis=1)
    return {
        "mAP": float(np.mean(aps)) if aps else float("nan"),
        "top1_in_labels": float(np.mean(targets[np.arange(len(top1)), top1])) if len(top1) else float("nan"),
    }


def most_frequent_concepts(
    labels_per_image: Sequence[Iterable[str]], k: int, exclude: Iterable[str] = ()
) -> list[str]:
    """The k concepts carried by the most images (each image counts once), ties by name."""
    excluded = set(exclude)
    counts = Counter(c for labels in labels_per_image for c in set(labels) if c not in excluded)
    if k < 1 or k > len(counts):
        raise ValueError(f"asked for k={k} concepts but the images carry {len(counts)} distinct ones")
    return [c for c, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:k]]


def build_concept_task(
    labels_per_image: Sequence[Iterable[str]],
    k: int,
    class_names: Mapping[str, str] | None = None,
    exclude: Iterable[str] = (),
) -> ConceptTask:
    """K-class task from the K most frequent concepts, keeping images with at least one of them.

    ``class_names`` maps a concept (e.g. a CUI) to the readable name put into prompts; concepts without
    an entry are used as they are, which suits ROCO keywords and modality labels but not raw CUIs.
    """
    labels_per_image = [set(labels) for labels in labels_per_image]
    concepts = most_frequent_concepts(labels_per_image, k, exclude)
    class_names = class_names or {}
    targets = np.array([[c in labels for c in concepts] for labels in labels_per_image], dtype=bool)
    keep = np.flatnonzero(targets.any(axis=1))
    return ConceptTask(
        concepts=tuple(concepts),
        class_names=tuple(class_names.get(c, c) for c in concepts),
        image_indices=keep,
        targets=targets[keep].reshape(len(keep), len(concepts)),
    )


def evaluate_zero_shot(
    image_embeds: np.ndarray,
    task: ConceptTask,
    encode_text: EncodeText,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
) -> dict[str, float]:
    """Zero-shot scores of one task; ``image_embeds`` are the rows of the original image list."""
    scores = zero_shot_scores(
        np.asarray(image_embeds)[task.image_indices],
        class_embeddings(task.class_names, encode_text, templates),
    )
    single = task.single_label
    return {
        "K": len(task.concepts),
        "n_images": len(task.image_indices),
        "n_single_label": int(single.sum()),
        # a random guess scores mean_labels_per_image / K under top1_in_labels
        "mean_labels_per_image": float(task.targets.sum(axis=1).mean()) if len(task.targets) else float("nan"),
        "acc": top1_accuracy(scores[single], np.argmax(task.targets[single], axis=1)),
        **multilabel_metrics(scores, task.targets),
    }


def evaluate_concept_tasks(
    image_embeds: np.ndarray,
    labels_per_image: Sequence[Iterable[str]],
    encode_text: EncodeText,
    ks: Sequence[int] = K_VALUES,
    class_names: Mapping[str, str] | None = None,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
) -> dict[int, dict[str, float]]:
    """:func:`evaluate_zero_shot` for the K-most-frequent-concept task at each K."""
    if len(image_embeds) != len(labels_per_image):
        raise ValueError(f"{len(image_embeds)} image embeddings but {len(labels_per_image)} label lists")
    return {
        k: evaluate_zero_shot(
            image_embeds, build_concept_task(labels_per_image, k, class_names), encode_text, templates
        )
        for k in ks
    }


def format_zero_shot_table(results: Mapping[int, Mapping[str, float]]) -> str:
    """Aligned plain-text table, one row per K; acc, top-1-in-labels and mAP in percent."""
    header = ["K", "images", "single", "acc%", "top1_in%", "mAP%"]
    rows = [
        [
            str(r["K"]),
            str(r["n_images"]),
            str(r["n_single_label"]),
            *(f"{100 * r[key]:.2f}" for key in ("acc", "top1_in_labels", "mAP")),
        ]
        for r in results.values()
    ]
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header, *rows])


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    if np.any(norms == 0) or not np.all(np.isfinite(norms)):
        raise ValueError("cannot normalise an embedding that is zero or not finite")
    return x / norms
