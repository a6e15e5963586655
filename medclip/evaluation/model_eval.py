"""Evaluating a saved model on a dataset: retrieval (full split and the PMC-CLIP 2,000-pair protocol) and
zero-shot classification over the most frequent ROCO keywords and imaging modalities; or one source's protocol
(`PROTOCOLS`: the CLIP-TF report's zero-shot classification by concepts)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medclip.data.records import Record
from medclip.evaluation.retrieval import PMC_CLIP_N_PAIRS, evaluate_retrieval, format_results_table
from medclip.evaluation.roco_labels import modality_labels
from medclip.evaluation.concept_zeroshot import REPORT_PROMPT_SET, concept_zero_shot, format_report_table
from medclip.evaluation.prompts import DEFAULT_PROMPT_SET, prompt_set
from medclip.evaluation.zeroshot import DEFAULT_TEMPLATES, K_VALUES, evaluate_concept_tasks, format_zero_shot_table

# `medclip evaluate --protocol NAME` -> the prompt set it uses unless --prompt_set says otherwise
PROTOCOLS = {"default": DEFAULT_PROMPT_SET, "clip-tf-report": REPORT_PROMPT_SET}


def embed_records(embedder, items: list[Record]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Image and first-caption embeddings of every record (records already passed the image checks)."""
    captions = [r.captions[0] for r in items]
    return embed_images(embedder, items), embedder.embed_texts(captions), captions


def embed_images(embedder, items: list[Record]) -> np.ndarray:
    """One row per record: an image the loader accepted that cannot be read now is an error, not a gap."""
    image_embeds, kept, skipped = embedder.embed_image_files([r.image for r in items])
    if skipped:
        raise ValueError(f"images became unreadable after loading: {skipped}")
    return image_embeds


def evaluate_model(embedder, items: list[Record], *, seed: int = 0, zeroshot: bool = True,
                   directions: tuple[str, ...] = ("i2t", "t2i"),
                   templates: Sequence[str] = DEFAULT_TEMPLATES) -> dict[str, Any]:
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
                scores = evaluate_concept_tasks(image_embeds, labels, embedder.embed_texts, ks=ks,
                                                templates=templates)
                results[f"zeroshot_{name}"] = {str(k): v for k, v in scores.items()}
                tables.append(f"zero-shot over {name}:\n{format_zero_shot_table(scores)}")
    results["table"] = "\n\n".join(tables)
    return results


def evaluate_concept_protocol(embedder, items: list[Record], names: Mapping[str, str],
                              templates: Sequence[str] = prompt_set(REPORT_PROMPT_SET)) -> dict[str, Any]:
    """The CLIP-TF report's zero-shot classification by concepts (medclip.evaluation.concept_zeroshot) on the
    records' CUIs, written with `names`."""
    result = concept_zero_shot(embed_images(embedder, items), [r.concepts for r in items], embedder.embed_texts, names,
                               templates=templates)
    return {"n_images": len(items), "protocol": "clip-tf-report",
            "zeroshot_concepts": {str(k): v for k, v in result["ks"].items()},
            "classes": [{"cui": cui, "name": name} for cui, name in result["classes"]],
            "templates": result["templates"], "table": format_report_table(result)}
