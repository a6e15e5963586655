"""Evaluating a saved model on a dataset: retrieval (full split and the PMC-CLIP 2,000-pair protocol) and
zero-shot classification over the most frequent ROCO keywords and imaging modalities."""

from __future__ import annotations

from typing import Any

import numpy as np

from medclip.data.records import Record
from medclip.evaluation.retrieval import PMC_CLIP_N_PAIRS, evaluate_retrieval, format_results_table
from medclip.evaluation.roco_labels import modality_labels
from medclip.evaluation.zeroshot import K_VALUES, evaluate_concept_tasks, format_zero_shot_table


def embed_records(embedder, items: list[Record]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Image and first-caption embeddings of every record (records already passed the image checks)."""
    image_embeds, kept, skipped = embedder.embed_image_files([r.image for r in items])
    if skipped:
        raise ValueError(f"images became unreadable after loading: {skipped}")
    captions = [r.captions[0] for r in items]
    return image_embeds, embedder.embed_texts(captions), captions


def evaluate_model(embedder, items: list[Record], *, seed: int = 0, zeroshot: bool = True,
                   directions: tuple[str, ...] = ("i2t", "t2i")) -> dict[str, Any]:
    """Retrieval in `directions` (i2t, t2i, t2t, i2i; t2t/i2i relevance from the records' concepts, else their
    captions), on the full split and the 2,000-pair protocol, and zero-shot classification."""
    image_embeds, text_embeds, captions = embed_records(embedder, items)
    results: dict[str, Any] = {"n_pairs": len(items)}
    retrieval = dict(directions=directions, concepts=[r.concepts for r in items])
    full = evaluate_retrieval(image_embeds, text_embeds, captions, **retrieval)
    tables = [format_results_table({"full": full})]
    results["retrieval_full"] = full.to_dict()
    if len(items) >= PMC_CLIP_N_PAIRS:
        pmc = evaluate_retrieval(image_embeds, text_embeds, captions, protocol="pmc-clip", seed=seed, **retrieval)
        results["retrieval_pmc_clip_2000"] = pmc.to_dict()
        tables.append(format_results_table({pmc.protocol: pmc}))
    if full.n_duplicate_groups:
        tables.append(f"({full.n_duplicate_groups} captions are shared by several images; each counts as correct "
                      "for all of them)")
    if zeroshot:
        for name, labels in (("keywords", [r.keywords for r in items]),
                             ("modality", [modality_labels(r.captions[0], r.keywords, r.concepts) for r in items])):
            distinct = len({label for row in labels for label in row})
            ks = [k for k in K_VALUES if k <= distinct]
            if ks and distinct >= 2:
                scores = evaluate_concept_tasks(image_embeds, labels, embedder.embed_texts, ks=ks)
                results[f"zeroshot_{name}"] = {str(k): v for k, v in scores.items()}
                tables.append(f"zero-shot over {name}:\n{format_zero_shot_table(scores)}")
    results["table"] = "\n\n".join(tables)
    return results
