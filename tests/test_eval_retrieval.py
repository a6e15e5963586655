"""Retrieval metrics: brute-force parity on random data, hand-made exact cases, duplicate captions."""

import tracemalloc

import numpy as np
import pytest

from medclip.evaluation.retrieval import (
    DIRECTIONS,
    caption_groups,
    evaluate_retrieval,
    format_results_table,
    ranks_to_metrics,
    relevance_groups,
    retrieval_metrics,
    retrieval_ranks,
    same_modality_ranks,
    sample_pairs,
)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _on_grid(rng: np.random.Generator, centers: np.ndarray, noise: float) -> np.ndarray:
    """Rows unit(center + noise), rounded to multiples of 2**-8; rows whose norm moved > 5e-4 are redrawn.

    Products are then multiples of 2**-16 and every partial sum of a dot product (|sum| <= 1) fits in
    float32's 24-bit mantissa: float32 and float64 scores are exactly equal whatever the summation order,
    exact ties are real ties, and distinct scores differ by >= 1.5e-5, far above the 1e-6 tie tolerance.
    So ranks can be compared for equality with a brute-force reference.
    """
    n, dim = centers.shape
    out = np.empty((n, dim), np.float32)
    todo = np.arange(n)
    while todo.size:
        noisy = centers[todo] + noise * rng.standard_normal((len(todo), dim)) / np.sqrt(dim)
        rows = np.round(_unit(noisy) * 256) / 256
        ok = np.abs(np.linalg.norm(rows, axis=1) - 1) <= 5e-4
        out[todo[ok]] = rows[ok]
        todo = todo[~ok]
    return out


def _noisy_pairs(rng: np.random.Generator, n: int, dim: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    images = _on_grid(rng, np.zeros((n, dim)), 1.0)
    return images, _on_grid(rng, images, noise)


def _reference_ranks(images, texts, image_groups, text_groups):
    """Brute force: full float64 score matrix, sort each query, find the first correct item.

    Among equal scores incorrect items sort first (pessimistic ties), as documented in retrieval.py.
    """
    scores = images.astype(np.float64) @ texts.astype(np.float64).T

    def ranks(score_rows, query_groups, item_groups):
        out = []
        for row, group in zip(score_rows, query_groups):
            correct = item_groups == group
            order = np.lexsort((correct, -row))  # primary: score descending; then incorrect first
            out.append(np.flatnonzero(correct[order])[0] + 1)
        return np.array(out)

    return ranks(scores, image_groups, text_groups), ranks(scores.T, text_groups, image_groups)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 4096])
def test_paired_ranks_match_brute_force(chunk_size):
    rng = np.random.default_rng(0)
    images, texts = _noisy_pairs(rng, 300, 32, noise=2.0)
    groups = np.arange(300)
    ref_i2t, ref_t2i = _reference_ranks(images, texts, groups, groups)
    assert ref_i2t.max() > 10 and (ref_i2t == 1).mean() > 0.2  # ranks are spread, not trivial

    i2t, t2i = retrieval_ranks(images, texts, chunk_size=chunk_size)
    np.testing.assert_array_equal(i2t, ref_i2t)
    np.testing.assert_array_equal(t2i, ref_t2i)


def test_many_exact_ties_match_brute_force():
    # Embeddings drawn from a pool of 12 vectors: most scores tie exactly with others.
    rng = np.random.default_rng(4)
    pool = _on_grid(rng, np.zeros((12, 8)), 1.0)
    image_ids = rng.integers(0, 12, 200)
    text_ids = np.where(rng.random(200) < 0.5, image_ids, rng.integers(0, 12, 200))
    images, texts = pool[image_ids], pool[text_ids]
    groups = np.arange(200)
    ref_i2t, ref_t2i = _reference_ranks(images, texts, groups, groups)
    assert ref_i2t.min() > 1  # every correct text has identical twins among the incorrect ones

    i2t, t2i = retrieval_ranks(images, texts, chunk_size=17)
    np.testing.assert_array_equal(i2t, ref_i2t)
    np.testing.assert_array_equal(t2i, ref_t2i)


def test_grouped_ranks_match_brute_force():
    # 250 images, 400 texts, 120 groups: some groups hold several images and/or several texts.
    rng = np.random.default_rng(1)
    n_groups = 120
    image_groups = np.concatenate([np.arange(n_groups), rng.integers(0, n_groups, 130)])
    text_groups = np.concatenate([np.arange(n_groups), rng.integers(0, n_groups, 280)])
    rng.shuffle(image_groups)
    rng.shuffle(text_groups)
    centers = _unit(rng.standard_normal((n_groups, 24)))
    images = _on_grid(rng, centers[image_groups], 1.5)
    texts = _on_grid(rng, centers[text_groups], 1.5)
    ref_i2t, ref_t2i = _reference_ranks(images, texts, image_groups, text_groups)
    assert ref_i2t.max() > 5

    result = retrieval_metrics(images, texts, image_groups, text_groups, chunk_size=33)
    np.testing.assert_array_equal(result.i2t_ranks, ref_i2t)
    np.testing.assert_array_equal(result.t2i_ranks, ref_t2i)
    assert result.n_images == 250 and result.n_texts == 400
    shared = {g for g in range(n_groups) if (image_groups == g).sum() > 1 or (text_groups == g).sum() > 1}
    assert result.n_duplicate_groups == len(shared)
    assert result["i2t_R@1"] == pytest.approx(np.mean(ref_i2t == 1))
    assert result["t2i_R@10"] == pytest.approx(np.mean(ref_t2i <= 10))
    assert result["i2t_mrr"] == pytest.approx(np.mean(1 / ref_i2t))
    assert result["t2i_median_rank"] == np.median(ref_t2i)
    assert result["t2i_mean_rank"] == pytest.approx(ref_t2i.mean())


def test_perfect_retrieval():
    result = retrieval_metrics(np.eye(3), np.eye(3))
    for direction in ("i2t", "t2i"):
        assert result[f"{direction}_R@1"] == 1.0
        assert result[f"{direction}_mrr"] == 1.0
        assert result[f"{direction}_median_rank"] == 1.0


def test_swapped_pairs_exact_values_and_pessimistic_ties():
    # Images e0, e1, e2; texts of pairs 0 and 1 swapped. Image 0's correct text scores 0, as does the
    # incorrect text 2 (a tie, counted ahead), and text 1 scores 1: rank 3.
    images = np.eye(3)
    texts = np.eye(3)[[1, 0, 2]]
    result = retrieval_metrics(images, texts)
    np.testing.assert_array_equal(result.i2t_ranks, [3, 3, 1])
    np.testing.assert_array_equal(result.t2i_ranks, [3, 3, 1])
    assert result["i2t_R@1"] == pytest.approx(1 / 3)
    assert result["i2t_R@5"] == 1.0
    assert result["t2i_mrr"] == pytest.approx((1 / 3 + 1 / 3 + 1) / 3)
    assert result["t2i_median_rank"] == 3.0
    assert result["i2t_mean_rank"] == pytest.approx(7 / 3)


def test_identical_embeddings_get_worst_rank():
    same = np.tile(np.array([[0.5, 0.5, 0.5, 0.5]]), (4, 1))
    result = retrieval_metrics(same, same)
    np.testing.assert_array_equal(result.i2t_ranks, [4, 4, 4, 4])
    assert result["i2t_R@1"] == 0.0 and result["t2i_R@5"] == 1.0


def test_bit_identical_duplicates_always_tie():
    # Every pair appears twice (not grouped). Float32 scores of the same two vectors differ by an ulp
    # between BLAS kernels (einsum vs GEMM: ~90% of pairs with OpenBLAS); with the tie tolerance each
    # duplicate still ranks ahead of the correct item, so every rank is exactly 2.
    rng = np.random.default_rng(5)
    images = _unit(rng.standard_normal((500, 512))).astype(np.float32)
    texts = _unit(images + 0.5 * rng.standard_normal((500, 512)) / np.sqrt(512)).astype(np.float32)
    images, texts = np.concatenate([images, images]), np.concatenate([texts, texts])
    i2t, t2i = retrieval_ranks(images, texts, chunk_size=300)
    assert set(i2t.tolist()) == {2} and set(t2i.tolist()) == {2}


def test_duplicate_captions_count_as_correct_for_each_image():
    # Pairs 0 and 2 share the caption "a"; identical captions encode to the same text embedding u.
    captions = ["a", "b", "a"]
    e = np.eye(4)
    u = _unit(e[0] + e[1])
    images = np.stack([e[0], e[3], e[1]])
    texts = np.stack([u, e[3], u])

    plain = retrieval_metrics(images, texts)  # pair i <-> i only: the twin caption ties and wins
    np.testing.assert_array_equal(plain.i2t_ranks, [2, 1, 2])
    np.testing.assert_array_equal(plain.t2i_ranks, [2, 1, 2])
    assert plain.n_duplicate_groups == 0

    groups = caption_groups(captions).group_ids
    grouped = retrieval_metrics(images, texts, groups, groups)
    np.testing.assert_array_equal(grouped.i2t_ranks, [1, 1, 1])
    np.testing.assert_array_equal(grouped.t2i_ranks, [1, 1, 1])
    assert grouped.n_duplicate_groups == 1

    full = evaluate_retrieval(images, texts, captions)
    assert full["i2t_R@1"] == 1.0 and full.n_duplicate_groups == 1 and full.protocol == "full"


def test_several_captions_per_image():
    # COCO-style: 2 images, 3 captions; captions 0 and 2 describe image 0.
    images = np.eye(3)[:2]
    texts = np.eye(3)[[2, 1, 0]]
    result = retrieval_metrics(images, texts, image_groups=[0, 1], text_groups=[0, 1, 0])
    np.testing.assert_array_equal(result.i2t_ranks, [1, 1])  # text 2 == e0 is correct for image 0
    np.testing.assert_array_equal(result.t2i_ranks, [2, 1, 1])  # text 0 (e2) ties both images
    assert result.n_duplicate_groups == 1


def test_caption_groups():
    groups = caption_groups(["a", "b", "a", "c", "b", "a", "A"])
    np.testing.assert_array_equal(groups.group_ids, [0, 1, 0, 2, 1, 0, 3])
    assert groups.n_duplicate_groups == 2
    assert groups.n_pairs_in_duplicate_groups == 5
    with pytest.raises(TypeError, match=r"captions\[1\]"):
        caption_groups(["a", None])


def test_sample_pairs_is_reproducible():
    first = sample_pairs(100_000)
    assert first.shape == (2000,)
    assert len(np.unique(first)) == 2000 and np.all(np.diff(first) > 0)
    assert first.min() >= 0 and first.max() < 100_000
    np.testing.assert_array_equal(first, sample_pairs(100_000, 2000, seed=0))
    # Pinned: if numpy's Generator stream ever changes, reported "2,000-pair" numbers change too.
    np.testing.assert_array_equal(first[:8], [18, 22, 29, 68, 232, 264, 268, 348])
    assert not np.array_equal(first, sample_pairs(100_000, 2000, seed=1))
    with pytest.raises(ValueError, match="cannot sample 2000 pairs out of 1500"):
        sample_pairs(1500)


def test_pmc_clip_protocol_scores_the_sampled_subset():
    rng = np.random.default_rng(2)
    images, texts = _noisy_pairs(rng, 2500, 16, noise=1.0)
    captions = [f"caption {i % 2400}" for i in range(2500)]  # 100 captions used twice
    result = evaluate_retrieval(images, texts, captions, protocol="pmc-clip", seed=3)
    index = sample_pairs(2500, 2000, seed=3)
    groups = caption_groups([captions[i] for i in index])
    expected = retrieval_metrics(images[index], texts[index], groups.group_ids, groups.group_ids)
    assert result.metrics == expected.metrics
    assert result.n_images == result.n_texts == 2000
    assert result.n_duplicate_groups == groups.n_duplicate_groups > 0
    assert result.protocol == "pmc-clip-2000 (seed 3)"
    with pytest.raises(ValueError, match="unknown protocol"):
        evaluate_retrieval(images, texts, protocol="random")


def test_chunked_pass_never_builds_the_full_matrix():
    rng = np.random.default_rng(3)
    images, texts = _noisy_pairs(rng, 4000, 16, noise=1.0)
    full_matrix_bytes = 4000 * 4000 * 4
    tracemalloc.start()
    retrieval_ranks(images, texts, chunk_size=256)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < full_matrix_bytes / 4  # 256 x 4000 blocks (float32 + 2 masks) are ~6 MB


def test_ranks_to_metrics_custom_ks():
    metrics = ranks_to_metrics(np.array([1, 2, 3, 50]), "i2t", ks=(2, 50))
    assert metrics == {
        "i2t_R@2": 0.5,
        "i2t_R@50": 1.0,
        "i2t_mrr": pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 50) / 4),
        "i2t_mrr@10": pytest.approx((1 + 1 / 2 + 1 / 3) / 4),  # rank 50 is past 10: counts 0
        "i2t_median_rank": 2.5,
        "i2t_mean_rank": 14.0,
    }


def test_input_errors_are_explained():
    with pytest.raises(ValueError, match="row 1 has L2 norm 2"):
        retrieval_metrics(np.array([[1.0, 0.0], [2.0, 0.0]]), np.eye(2))
    with pytest.raises(ValueError, match="row 0 has L2 norm nan"):
        retrieval_metrics(np.array([[np.nan, 0.0]]), np.eye(2)[:1])
    with pytest.raises(ValueError, match="pass image_groups and text_groups"):
        retrieval_metrics(np.eye(3), np.eye(3)[:2])
    with pytest.raises(ValueError, match=r"image 1 \(group 5\) has no correct text"):
        retrieval_metrics(np.eye(2), np.eye(2), [0, 5], [0, 1])
    with pytest.raises(ValueError, match="dim 3 != text_embeds dim 2"):
        retrieval_metrics(np.eye(3), np.eye(2)[[0, 1, 1]])


def test_format_results_table_is_aligned():
    swapped = retrieval_metrics(np.eye(3), np.eye(3)[[1, 0, 2]], protocol="swapped")
    perfect = retrieval_metrics(np.eye(3), np.eye(3), protocol="perfect")
    table = format_results_table([swapped, perfect])
    lines = table.splitlines()
    header, rule, rows = lines[0], lines[1], lines[2:6]
    assert header.split() == [
        "protocol", "dir", "queries", "R@1%", "R@5%", "R@10%", "MRR", "MRR@10", "MedR", "MeanR", "dup",
    ]
    assert len({len(header), len(rule), *map(len, rows)}) == 1  # every column lines up
    assert rows[0].split() == ["swapped", "i2t", "3", "33.33", "100.00", "100.00", "0.5556", "0.5556", "3", "2.3",
                               "0"]
    assert rows[3].split()[:4] == ["perfect", "t2i", "3", "100.00"]
    assert format_results_table({"named": perfect}).splitlines()[2].startswith("named")


def _reference_same_modality(embeds, groups):
    """Brute force t2t/i2i: float64 scores, the query removed, pessimistic ties, singleton groups skipped."""
    scores = embeds.astype(np.float64) @ embeds.astype(np.float64).T
    ranks, queries = [], []
    for i, row in enumerate(scores):
        others = np.delete(np.arange(len(embeds)), i)
        correct = groups[others] == groups[i]
        if not correct.any():
            continue
        order = np.lexsort((correct, -row[others]))
        ranks.append(np.flatnonzero(correct[order])[0] + 1)
        queries.append(i)
    return np.array(ranks), np.array(queries)


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_same_modality_ranks_match_brute_force(chunk_size):
    rng = np.random.default_rng(4)
    centers = _on_grid(rng, np.zeros((12, 16)), 1.0)
    groups = rng.integers(0, 12, 90)
    groups[:5] = 100 + np.arange(5)  # singletons: no correct answer, left out
    embeds = _on_grid(rng, centers[groups % 12], 0.8)
    embeds[10] = embeds[11]  # an exact tie
    ranks, queries = same_modality_ranks(embeds, groups, chunk_size=chunk_size)
    expected_ranks, expected_queries = _reference_same_modality(embeds, groups)
    np.testing.assert_array_equal(queries, expected_queries)
    np.testing.assert_array_equal(ranks, expected_ranks)
    assert 0 not in queries and len(queries) <= 85


def test_all_four_directions_and_relevance_groups():
    captions = ["ct chest", "ct chest", "mri head", "xray knee", "xray hand"]
    concepts = [["C1"], ["C1"], ["C2"], ["C3", "C4"], ["C4", "C3"]]
    assert relevance_groups(captions).tolist() == [0, 0, 1, 2, 3]  # identical captions only
    assert relevance_groups(captions, concepts).tolist() == [0, 0, 1, 2, 2]  # same concept set
    assert relevance_groups(captions, [[], [], [], ["C3"], []]).tolist() == [0, 0, 1, 2, 3]  # captions as fallback
    rng = np.random.default_rng(0)
    images, texts = _noisy_pairs(rng, 5, 8, 0.1)
    result = evaluate_retrieval(images, texts, captions, concepts=concepts, directions=DIRECTIONS)
    assert result.directions == ["i2t", "t2i", "t2t", "i2i"]
    assert result.n_queries("i2i") == 4 and result.to_dict()["t2t_n_queries"] == 4  # "mri head" has no partner
    relevance = relevance_groups(captions, concepts)
    for direction, embeds in (("t2t", texts), ("i2i", images)):
        ranks, _ = _reference_same_modality(embeds, relevance)
        assert result[f"{direction}_mrr"] == pytest.approx(np.mean(1 / ranks))
        assert result[f"{direction}_R@1"] == pytest.approx(np.mean(ranks <= 1))
    table = format_results_table(result).splitlines()
    assert [row.split()[1] for row in table[2:6]] == ["i2t", "t2i", "t2t", "i2i"] and "t2t/i2i" in table[-1]
    only = evaluate_retrieval(images, texts, captions, directions=("i2i",))
    assert only.directions == ["i2i"] and "i2t_R@1" not in only.metrics
    with pytest.raises(ValueError, match="unknown retrieval direction"):
        evaluate_retrieval(images, texts, captions, directions=("x2y",))
    unique = evaluate_retrieval(images, texts, [f"c{i}" for i in range(5)], directions=("i2t", "t2t"))
    assert unique.directions == ["i2t"] and unique.to_dict()["t2t_n_queries"] == 0  # nothing to score
    assert "t2t: no query has a relevant item" in format_results_table(unique)
