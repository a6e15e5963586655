"""The CLIP TensorFlow & ROCO report's headline evaluation (its Table 2): zero-shot classification by concepts.

The candidate classes are the K most frequent concepts (UMLS CUIs) of the test set, K = 2, 5, 10 and 30, each
written as its name in the prompt "A photo of a {label}."; an image takes part in a K-class task when it carries at
least one of the K concepts, and its predicted class is the one whose prompt is closest to it. The report calls it
multi-label classification with a variable number of classes and does not say when a prediction counts as right:
we count it right when the predicted class is among the image's concepts (`top1_in_labels`). That reading is ours.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from medclip.evaluation.prompts import prompt_set
from medclip.evaluation.zeroshot import EncodeText, evaluate_concept_tasks, most_frequent_concepts

REPORT_KS = (2, 5, 10, 30)
REPORT_PROMPT_SET = "clip-tf-report"
READING = ("correct = the predicted class is among the image's concepts (our reading; the report does not "
           "define it)")


def concept_zero_shot(image_embeds: np.ndarray, concepts_per_image: Sequence[Iterable[str]],
                      encode_text: EncodeText, names: Mapping[str, str] | None = None,
                      ks: Sequence[int] = REPORT_KS,
                      templates: Sequence[str] = prompt_set(REPORT_PROMPT_SET)) -> dict[str, Any]:
    """The K-class tasks the data allows (K up to the number of distinct concepts), scored as the report's table.

    Returns {"ks": {K: scores}, "classes": the largest task's (CUI, name) pairs most frequent first, "unnamed":
    how many of them have no name (written as their code), "skipped_ks": the Ks the data has too few concepts for}.
    """
    concepts_per_image = [set(c) for c in concepts_per_image]
    names = names or {}
    distinct = len({c for row in concepts_per_image for c in row})
    usable = [k for k in ks if 2 <= k <= distinct]
    if not usable:
        raise ValueError(f"the images carry {distinct} distinct concepts: zero-shot by concepts needs at least 2")
    scores = evaluate_concept_tasks(image_embeds, concepts_per_image, encode_text, ks=usable, class_names=names,
                                    templates=templates)
    largest = most_frequent_concepts(concepts_per_image, max(usable))
    return {
        "ks": scores,
        "classes": [(cui, names.get(cui, cui)) for cui in largest],
        "unnamed": sum(cui not in names for cui in largest),
        "skipped_ks": [k for k in ks if k not in usable],
        "templates": list(templates),
    }


def format_report_table(result: Mapping[str, Any]) -> str:
    """The report's shape: one column per number of classes, the accuracy in percent, then how many test images
    each task has; the classes and the reading below."""
    ks = list(result["ks"])
    header = ["classes", *(str(k) for k in ks)]
    accuracy = ["accuracy %", *(f"{100 * result['ks'][k]['top1_in_labels']:.2f}" for k in ks)]
    chance = ["chance %", *(f"{100 * _chance(result['ks'][k]):.2f}" for k in ks)]
    images = ["images", *(str(result["ks"][k]["n_images"]) for k in ks)]
    rows = [header, accuracy, chance, images]
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = ["zero-shot classification by concepts (CLIP-TF report, Table 2 protocol; prompt "
             f"{' | '.join(result['templates'])!r})"]
    lines += ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
              for row in rows]
    if result["skipped_ks"]:
        lines.append(f"(K = {', '.join(map(str, result['skipped_ks']))} left out: the images carry fewer concepts)")
    classes = ", ".join(f"{name} ({cui})" if name != cui else cui for cui, name in result["classes"])
    lines.append(f"classes, most frequent first: {classes}")
    if result["unnamed"]:
        lines.append(f"({result['unnamed']} of them have no name and are written as their CUI: ROCO v1 ships CUIs "
                     "only; pass --concept_names CUI,name CSV)")
    lines.append(READING)
    return "\n".join(lines)


def _chance(scores: Mapping[str, Any]) -> float:
    """What a random guess scores: the mean share of the K classes each image carries."""
    return float(scores["mean_labels_per_image"]) / float(scores["K"])
