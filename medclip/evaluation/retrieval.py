"""Retrieval metrics from precomputed embeddings: image->text and text->image, and within one modality
text->text and image->image.

The model is not needed here: everything works on L2-normalised embeddings, so the same code scores a
checkpoint, a baseline, or random vectors in a test.

Ground truth. Every image and every text carries a *group id*; a text is a correct answer for an image
(and vice versa) exactly when their group ids are equal. That one rule covers the common cases:

* paired data, pair i <-> i: both group arrays are ``arange(n)`` (the default);
* ROCO-style duplicate captions: pairs whose caption strings are identical share a group, so each of
  those captions counts as correct for each of those images (:func:`caption_groups`);
* several captions per image (COCO-style): ``text_groups[j]`` is the index of the image of caption j.

Ranks. For a query, rank = 1 + the number of *incorrect* candidates whose score is ``>=`` the score of
the best-scoring correct candidate minus ``TIE_TOLERANCE`` (1-based rank of the first correct hit).
Ties are broken *pessimistically*: an incorrect candidate scoring the same as the correct one is ranked
ahead of it, so degenerate embeddings (all equal) get the worst rank, not R@1 = 100%. Other correct
candidates never push the rank down. Scores within ``TIE_TOLERANCE`` (1e-6) count as tied because float32
dot products of the same two vectors differ by about an ulp between BLAS kernels (einsum vs GEMM, edge
tiles; measured up to 1.2e-7): without it a bit-identical duplicate (the same image twice, a repeated
caption left ungrouped) would tie or not by accident.

Within one modality (t2t, i2i; the "CLIP TensorFlow & ROCO" report evaluates all four directions). A query is
one item; the gallery is every *other* item of the same modality; the correct answers are the other items in the
query's *relevance group* (:func:`relevance_groups`): items with the same set of UMLS concepts (ROCO's cuis.txt,
ROCOv2's *_concepts.csv), or, for items without concepts, the same caption string. The paired item is no proxy
here: an image's own caption is in the other modality. Queries whose group has no other member cannot be scored
and are left out (the result says how many were scored). Ranks, ties and MRR are as above.

MRR@K. Mean of 1/rank where rank <= K, 0 otherwise (``{dir}_mrr@10`` by default, beside the plain MRR).

Cost. Scores are computed one block of ``chunk_size`` images at a time against all texts
(``chunk_size x M`` floats, 40 MB for 1024 x 10k), and both directions are read off the same block, so
the full N x M matrix never exists and each score is computed once. The best correct score of every query
is computed beforehand from its group only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

RECALL_KS = (1, 5, 10)
MRR_KS = (10,)
DIRECTIONS = ("i2t", "t2i", "t2t", "i2i")
DEFAULT_CHUNK_SIZE = 1024
PMC_CLIP_N_PAIRS = 2000  # PMC-CLIP reports retrieval on 2,000 pairs drawn from the ROCO test split.
TIE_TOLERANCE = 1e-6  # scores closer than this are ties (about 10x float32 rounding of a unit dot product)
_NORM_TOLERANCE = 1e-3


@dataclasses.dataclass(frozen=True)
class CaptionGroups:
    """Group ids for paired data where identical caption strings are interchangeable answers."""

    group_ids: np.ndarray  # (n_pairs,) int64; equal ids <=> identical caption strings
    n_duplicate_groups: int  # caption strings used by more than one pair
    n_pairs_in_duplicate_groups: int


@dataclasses.dataclass(frozen=True)
class RetrievalResult:
    """Retrieval metrics per direction; index it like a dict: ``result["i2t_R@1"]``.

    Recalls and MRR are fractions in [0, 1]; ranks are 1-based. Keys: ``{dir}_R@{k}``, ``{dir}_mrr``,
    ``{dir}_mrr@{k}``, ``{dir}_median_rank``, ``{dir}_mean_rank`` for each direction in ``directions``.
    """

    metrics: dict[str, float]
    n_images: int
    n_texts: int
    n_duplicate_groups: int  # groups holding more than one image or more than one text
    i2t_ranks: np.ndarray = dataclasses.field(repr=False)  # (n_images,) rank of first correct text
    t2i_ranks: np.ndarray = dataclasses.field(repr=False)  # (n_texts,) rank of first correct image
    protocol: str = "full"
    # Within-modality directions ("t2t", "i2i") -> ranks of the queries that have a correct answer.
    same_modality_ranks: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)

    def __getitem__(self, key: str) -> float:
        return self.metrics[key]

    @property
    def directions(self) -> list[str]:
        return [d for d in DIRECTIONS if f"{d}_mrr" in self.metrics]

    def n_queries(self, direction: str) -> int:
        if direction in self.same_modality_ranks:
            return len(self.same_modality_ranks[direction])
        return self.n_images if direction == "i2t" else self.n_texts

    def to_dict(self) -> dict[str, float | int | str]:
        """Flat, JSON-ready dict (metrics plus counts), e.g. for a metrics log."""
        return {
            **self.metrics,
            "n_images": self.n_images,
            "n_texts": self.n_texts,
            "n_duplicate_groups": self.n_duplicate_groups,
            **{f"{d}_n_queries": len(r) for d, r in self.same_modality_ranks.items()},
            "protocol": self.protocol,
        }


def caption_groups(captions: Sequence[str]) -> CaptionGroups:
    """Give pairs with identical caption strings the same group id.

    Matching is exact (case and whitespace included) so it never merges captions a reader would call
    different; normalise the strings first if you want looser matching.
    """
    ids: dict[str, int] = {}
    group_ids = np.empty(len(captions), dtype=np.int64)
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise TypeError(f"captions[{i}] is {type(caption).__name__}, expected str")
        group_ids[i] = ids.setdefault(caption, len(ids))
    sizes = np.bincount(group_ids, minlength=len(ids))
    shared = sizes > 1
    return CaptionGroups(group_ids, int(shared.sum()), int(sizes[shared].sum()))


def sample_pairs(n_total: int, n: int = PMC_CLIP_N_PAIRS, seed: int = 0) -> np.ndarray:
    """Indices of ``n`` distinct pairs out of ``n_total``, sorted, reproducible from ``seed``.

    This pins down PMC-CLIP's "2,000 random pairs" protocol: the same (n_total, n, seed) always gives the
    same subset (numpy PCG64 Generator), so numbers are comparable across runs and machines.
    """
    if not 0 < n <= n_total:
        raise ValueError(
            f"cannot sample {n} pairs out of {n_total}; use the full protocol or a smaller n"
        )
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_total, size=n, replace=False))


def retrieval_ranks(
    image_embeds: np.ndarray,
    text_embeds: np.ndarray,
    image_groups: np.ndarray | None = None,
    text_groups: np.ndarray | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    tie_tolerance: float = TIE_TOLERANCE,
) -> tuple[np.ndarray, np.ndarray]:
    """1-based rank of the best correct item per query: ``(i2t_ranks (N,), t2i_ranks (M,))``.

    Without groups, image i and text i are the only correct match for each other (requires N == M).
    """
    image_embeds = _as_unit_rows("image_embeds", image_embeds)  # (N, D)
    text_embeds = _as_unit_rows("text_embeds", text_embeds)  # (M, D)
    if image_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(
            f"image_embeds dim {image_embeds.shape[1]} != text_embeds dim {text_embeds.shape[1]}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not tie_tolerance >= 0:
        raise ValueError(f"tie_tolerance must be >= 0, got {tie_tolerance}")
    image_groups, text_groups = _dense_groups(
        image_groups, text_groups, len(image_embeds), len(text_embeds)
    )
    best_image, best_text = _best_correct_scores(
        image_embeds, text_embeds, image_groups, text_groups, chunk_size
    )
    # Lowering the bar by the tolerance makes near-exact ties count against the correct item.
    return _count_beaten(
        image_embeds,
        text_embeds,
        image_groups,
        text_groups,
        best_image - np.float32(tie_tolerance),
        best_text - np.float32(tie_tolerance),
        chunk_size,
    )


def metric_names(directions: Sequence[str] = ("i2t", "t2i"), ks: Sequence[int] = RECALL_KS,
                 mrr_ks: Sequence[int] = MRR_KS) -> list[str]:
    """The keys of the metrics (`ranks_to_metrics`, `evaluate_retrieval`) for these directions, in their order:
    known without scoring anything, so a flag that names a metric is checked before a run starts."""
    per_direction = (*(f"R@{k}" for k in ks), "mrr", *(f"mrr@{k}" for k in mrr_ks), "median_rank", "mean_rank")
    return [f"{direction}_{name}" for direction in directions for name in per_direction]


def ranks_to_metrics(ranks: np.ndarray, prefix: str, ks: Sequence[int] = RECALL_KS,
                     mrr_ks: Sequence[int] = MRR_KS) -> dict[str, float]:
    """Recall@k, MRR, MRR@k, median and mean rank for one direction, keys prefixed (``i2t_R@1``...)."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError(f"no {prefix} queries to score")
    values = (*(np.mean(ranks <= k) for k in ks), np.mean(1.0 / ranks),
              *(np.mean(np.where(ranks <= k, 1.0 / ranks, 0.0)) for k in mrr_ks), np.median(ranks), np.mean(ranks))
    return {name: float(value) for name, value in zip(metric_names((prefix,), ks, mrr_ks), values, strict=True)}


def relevance_groups(captions: Sequence[str], concepts: Sequence[Sequence[str]] | None = None) -> np.ndarray:
    """Group ids for within-modality retrieval: the same non-empty concept set, else the same caption string."""
    keys: dict[object, int] = {}
    groups = np.empty(len(captions), np.int64)
    for i, caption in enumerate(captions):
        item_concepts = frozenset(concepts[i]) if concepts is not None else frozenset()
        key = ("concepts", item_concepts) if item_concepts else ("caption", caption)
        groups[i] = keys.setdefault(key, len(keys))
    return groups


def same_modality_ranks(
    embeds: np.ndarray,
    groups: np.ndarray,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    tie_tolerance: float = TIE_TOLERANCE,
) -> tuple[np.ndarray, np.ndarray]:
    """Within one modality: ``(ranks (Q,), queries (Q,))`` for the Q items with another member in their group.

    The gallery of query i is every item but i; the correct answers are the other members of its group.
    """
    embeds = _as_unit_rows("embeds", embeds)  # (N, D)
    groups = np.asarray(groups)
    if groups.shape != (len(embeds),):
        raise ValueError(f"groups must have shape ({len(embeds)},), got {groups.shape}")
    _, dense, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    queries = np.flatnonzero(sizes[dense] > 1)
    ranks = np.empty(len(queries), np.int64)
    for start in range(0, len(queries), chunk_size):
        rows = queries[start : start + chunk_size]
        block = embeds[rows] @ embeds.T  # (n, N)
        block[np.arange(len(rows)), rows] = -np.inf  # the query itself is not in its gallery
        correct = dense[rows, None] == dense[None, :]
        correct[np.arange(len(rows)), rows] = False
        best = np.where(correct, block, -np.inf).max(axis=1)
        beaten = (block >= (best - np.float32(tie_tolerance))[:, None]) & ~correct
        beaten[np.arange(len(rows)), rows] = False
        ranks[start : start + len(rows)] = beaten.sum(axis=1) + 1
    return ranks, queries


def retrieval_metrics(
    image_embeds: np.ndarray,
    text_embeds: np.ndarray,
    image_groups: np.ndarray | None = None,
    text_groups: np.ndarray | None = None,
    *,
    ks: Sequence[int] = RECALL_KS,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    tie_tolerance: float = TIE_TOLERANCE,
    protocol: str = "full",
    directions: Sequence[str] = ("i2t", "t2i"),
    relevance: np.ndarray | None = None,
    mrr_ks: Sequence[int] = MRR_KS,
) -> RetrievalResult:
    """Retrieval in `directions` on all given embeddings; see the module docstring for ranks and ties.

    "t2t" and "i2i" need paired data and `relevance` (per-pair group ids, :func:`relevance_groups`).
    """
    unknown = [d for d in directions if d not in DIRECTIONS]
    if unknown or not directions:
        raise ValueError(f"unknown retrieval direction(s) {unknown}; choose from {', '.join(DIRECTIONS)}")
    i2t, t2i = retrieval_ranks(
        image_embeds,
        text_embeds,
        image_groups,
        text_groups,
        chunk_size=chunk_size,
        tie_tolerance=tie_tolerance,
    )
    if image_groups is None:
        n_duplicate_groups = 0
    else:
        n_duplicate_groups = _count_shared_groups(np.asarray(image_groups), np.asarray(text_groups))
    metrics = {}
    for direction, ranks in (("i2t", i2t), ("t2i", t2i)):
        if direction in directions:
            metrics.update(ranks_to_metrics(ranks, direction, ks, mrr_ks))
    same_modality = {}
    for direction, embeds in (("t2t", text_embeds), ("i2i", image_embeds)):
        if direction not in directions:
            continue
        if relevance is None or len(image_embeds) != len(text_embeds):
            raise ValueError(f"{direction} retrieval needs paired data and relevance groups (relevance_groups)")
        ranks, _ = same_modality_ranks(embeds, relevance, chunk_size=chunk_size, tie_tolerance=tie_tolerance)
        same_modality[direction] = ranks
        if ranks.size:  # else no query has a relevant item (n_queries 0, no metrics): every group has one member
            metrics.update(ranks_to_metrics(ranks, direction, ks, mrr_ks))
    return RetrievalResult(
        metrics=metrics,
        n_images=len(i2t),
        n_texts=len(t2i),
        n_duplicate_groups=n_duplicate_groups,
        i2t_ranks=i2t,
        t2i_ranks=t2i,
        protocol=protocol,
        same_modality_ranks=same_modality,
    )


def evaluate_retrieval(
    image_embeds: np.ndarray,
    text_embeds: np.ndarray,
    captions: Sequence[str] | None = None,
    *,
    protocol: str = "full",
    n_pairs: int = PMC_CLIP_N_PAIRS,
    seed: int = 0,
    ks: Sequence[int] = RECALL_KS,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    directions: Sequence[str] = ("i2t", "t2i"),
    concepts: Sequence[Sequence[str]] | None = None,
) -> RetrievalResult:
    """Retrieval on paired data (row i of both arrays is one pair) under a named protocol.

    ``directions`` may add "t2t" and "i2i", whose relevance groups come from ``concepts`` and ``captions``
    (:func:`relevance_groups`).

    ``protocol="full"`` scores the whole split; ``protocol="pmc-clip"`` scores the ``n_pairs`` pairs
    chosen by :func:`sample_pairs` (PMC-CLIP's 2,000-pair protocol). With ``captions``, identical captions
    count as correct for each other's images (counted within the evaluated pairs).
    """
    n_total = len(image_embeds)
    if len(text_embeds) != n_total:
        raise ValueError(
            f"paired data needs as many texts as images: {n_total} images, {len(text_embeds)} texts"
        )
    if captions is not None and len(captions) != n_total:
        raise ValueError(f"{len(captions)} captions for {n_total} pairs")
    if protocol == "full":
        index, label = np.arange(n_total), "full"
    elif protocol == "pmc-clip":
        index, label = sample_pairs(n_total, n_pairs, seed), f"pmc-clip-{n_pairs} (seed {seed})"
    else:
        raise ValueError(f"unknown protocol {protocol!r}; expected 'full' or 'pmc-clip'")
    groups = relevance = None
    if captions is not None:
        groups = caption_groups([captions[i] for i in index]).group_ids
    if {"t2t", "i2i"} & set(directions):
        if captions is None:
            raise ValueError("t2t and i2i retrieval need the captions (and concepts) to know what is relevant")
        relevance = relevance_groups([captions[i] for i in index],
                                     None if concepts is None else [concepts[i] for i in index])
    return retrieval_metrics(
        np.asarray(image_embeds)[index],
        np.asarray(text_embeds)[index],
        groups,
        groups,
        ks=ks,
        chunk_size=chunk_size,
        protocol=label,
        directions=directions,
        relevance=relevance,
    )


def format_results_table(
    results: RetrievalResult | Sequence[RetrievalResult] | Mapping[str, RetrievalResult],
) -> str:
    """Aligned plain-text table, one row per (result, direction); recalls shown in percent."""
    if isinstance(results, RetrievalResult):
        results = [results]
    if not isinstance(results, Mapping):
        results = {r.protocol: r for r in results}
    if not results:
        raise ValueError("no results to format")
    first = next(iter(results.values()))
    lead = first.directions[0]
    ks = [key.split("@")[1] for key in first.metrics if key.startswith(f"{lead}_R@")]
    mrr_ks = [key.split("@")[1] for key in first.metrics if key.startswith(f"{lead}_mrr@")]
    header = ["protocol", "dir", "queries", *(f"R@{k}%" for k in ks), "MRR", *(f"MRR@{k}" for k in mrr_ks),
              "MedR", "MeanR", "dup"]
    rows = []
    for name, result in results.items():
        for direction in result.directions:
            m = result.metrics
            rows.append(
                [
                    name,
                    direction,
                    str(result.n_queries(direction)),
                    *(f"{100 * m[f'{direction}_R@{k}']:.2f}" for k in ks),
                    f"{m[f'{direction}_mrr']:.4f}",
                    *(f"{m[f'{direction}_mrr@{k}']:.4f}" for k in mrr_ks),
                    f"{m[f'{direction}_median_rank']:g}",
                    f"{m[f'{direction}_mean_rank']:.1f}",
                    str(result.n_duplicate_groups),
                ]
            )
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]

    def line(cells: list[str]) -> str:
        # Text columns left-aligned, numbers right-aligned.
        return "  ".join(
            cell.ljust(w) if c < 2 else cell.rjust(w) for c, (cell, w) in enumerate(zip(cells, widths))
        ).rstrip()

    note = "dup = duplicate-caption groups; rank = 1-based rank of the first correct item"
    if any(result.same_modality_ranks for result in results.values()):
        note += ("; t2t/i2i: correct = other items with the same concept set (else the same caption), queries "
                 "without one left out")
        for direction in ("t2t", "i2i"):
            if any(len(r.same_modality_ranks.get(direction, [0])) == 0 for r in results.values()):
                note += f"; {direction}: no query has a relevant item (no shared concepts or captions)"
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows), note])


# --- internals -------------------------------------------------------------------------------------


def _as_unit_rows(name: str, embeds: np.ndarray) -> np.ndarray:
    """float32 C-contiguous (n, d) array, checked to have unit-length finite rows."""
    embeds = np.asarray(embeds)
    if embeds.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, dim), got shape {embeds.shape}")
    if not np.issubdtype(embeds.dtype, np.floating):
        raise TypeError(f"{name} must be floating point, got {embeds.dtype}")
    embeds = np.ascontiguousarray(embeds, dtype=np.float32)
    norms = np.sqrt(np.einsum("nd,nd->n", embeds, embeds))
    bad = np.flatnonzero(~(np.abs(norms - 1.0) <= _NORM_TOLERANCE))  # also catches NaN
    if bad.size:
        raise ValueError(
            f"{name} row {bad[0]} has L2 norm {norms[bad[0]]:.4g} ({bad.size} rows are not unit "
            "length); pass L2-normalised embeddings: x / np.linalg.norm(x, axis=-1, keepdims=True)"
        )
    return embeds


def _dense_groups(
    image_groups: np.ndarray | None, text_groups: np.ndarray | None, n_images: int, n_texts: int
) -> tuple[np.ndarray, np.ndarray]:
    """Validate group ids and relabel them 0..G-1 (int64)."""
    if image_groups is None and text_groups is None:
        if n_images != n_texts:
            raise ValueError(
                f"{n_images} images but {n_texts} texts: pass image_groups and text_groups to say "
                "which texts are correct for which image"
            )
        return np.arange(n_images), np.arange(n_texts)
    if image_groups is None or text_groups is None:
        raise ValueError("pass both image_groups and text_groups, or neither (pair i <-> i)")
    checked = []
    for name, groups, n in (("image_groups", image_groups, n_images), ("text_groups", text_groups, n_texts)):
        groups = np.asarray(groups)
        if groups.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {groups.shape}")
        if groups.size and not np.issubdtype(groups.dtype, np.integer):
            raise TypeError(f"{name} must hold integer group ids, got {groups.dtype}")
        checked.append(groups)
    image_groups, text_groups = checked
    for name, groups, other, what in (
        ("image", image_groups, text_groups, "text"),
        ("text", text_groups, image_groups, "image"),
    ):
        orphan = np.flatnonzero(~np.isin(groups, other))
        if orphan.size:
            raise ValueError(
                f"{name} {orphan[0]} (group {groups[orphan[0]]}) has no correct {what} "
                f"({orphan.size} such {name}s); every query needs at least one correct answer"
            )
    unique, image_dense = np.unique(image_groups, return_inverse=True)
    return image_dense.astype(np.int64), np.searchsorted(unique, text_groups).astype(np.int64)


def _count_shared_groups(image_groups: np.ndarray, text_groups: np.ndarray) -> int:
    images, image_counts = np.unique(image_groups, return_counts=True)
    texts, text_counts = np.unique(text_groups, return_counts=True)
    return len(np.union1d(images[image_counts > 1], texts[text_counts > 1]))


def _best_correct_scores(
    image_embeds: np.ndarray,
    text_embeds: np.ndarray,
    image_groups: np.ndarray,
    text_groups: np.ndarray,
    chunk_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Highest score among each query's correct answers: ``(per image (N,), per text (M,))``."""
    n_groups = int(image_groups.max()) + 1 if image_groups.size else 0
    images_per_group = np.bincount(image_groups, minlength=n_groups)
    texts_per_group = np.bincount(text_groups, minlength=n_groups)
    best_image = np.empty(len(image_groups), np.float32)
    best_text = np.empty(len(text_groups), np.float32)

    # One image and one text in the group (the usual case): a single dot product, vectorised.
    single = (images_per_group == 1) & (texts_per_group == 1)
    text_of_group = np.zeros(n_groups, np.int64)
    text_of_group[text_groups] = np.arange(len(text_groups))
    images = np.flatnonzero(single[image_groups])
    texts = text_of_group[image_groups[images]]
    scores = np.einsum("nd,nd->n", image_embeds[images], text_embeds[texts])
    best_image[images], best_text[texts] = scores, scores

    # Shared groups (duplicate captions, several captions per image): a small block per group.
    shared = np.flatnonzero(~single)
    if shared.size:
        image_members = np.split(np.argsort(image_groups, kind="stable"), np.cumsum(images_per_group)[:-1])
        text_members = np.split(np.argsort(text_groups, kind="stable"), np.cumsum(texts_per_group)[:-1])
        for group in shared:
            rows, cols = image_members[group], text_members[group]
            col_best = np.full(len(cols), -np.inf, np.float32)
            for start in range(0, len(rows), chunk_size):  # bounded memory for huge groups
                block = image_embeds[rows[start : start + chunk_size]] @ text_embeds[cols].T
                best_image[rows[start : start + chunk_size]] = block.max(axis=1)
                np.maximum(col_best, block.max(axis=0), out=col_best)
            best_text[cols] = col_best
    return best_image, best_text


def _count_beaten(
    image_embeds: np.ndarray,
    text_embeds: np.ndarray,
    image_groups: np.ndarray,
    text_groups: np.ndarray,
    bar_image: np.ndarray,
    bar_text: np.ndarray,
    chunk_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """One pass over image chunks; counts incorrect candidates scoring >= each query's bar."""
    n_images, n_texts = len(image_embeds), len(text_embeds)
    rows = min(chunk_size, max(n_images, 1))
    text_embeds_t = text_embeds.T  # (D, M) view: the transposed-B GEMM is the fast BLAS path
    scores = np.empty((rows, n_texts), np.float32)  # reused buffers: no allocation per chunk
    correct = np.empty((rows, n_texts), bool)
    beats = np.empty((rows, n_texts), bool)
    i2t_beaten = np.empty(n_images, np.int64)
    t2i_beaten = np.zeros(n_texts, np.int64)
    for start in range(0, n_images, rows):
        stop = min(start + rows, n_images)
        n = stop - start
        block, is_correct, beat = scores[:n], correct[:n], beats[:n]
        np.matmul(image_embeds[start:stop], text_embeds_t, out=block)  # (n, M)
        # Correct pairs must never count as beating the best correct item: push them to -inf.
        np.equal(image_groups[start:stop, None], text_groups[None, :], out=is_correct)
        np.copyto(block, -np.inf, where=is_correct)
        # Summing uint8 views with an explicit accumulator is several times faster than bool.sum().
        np.greater_equal(block, bar_image[start:stop, None], out=beat)
        i2t_beaten[start:stop] = beat.view(np.uint8).sum(axis=1, dtype=np.int32)
        np.greater_equal(block, bar_text[None, :], out=beat)
        t2i_beaten += beat.view(np.uint8).sum(axis=0, dtype=np.int32)
    return i2t_beaten + 1, t2i_beaten + 1
