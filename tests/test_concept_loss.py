"""The concept-aware contrastive loss (MedCLIP's semantic matching): against a NumPy reference, identical
captions are not pushed apart, and weight 0 without false-negative handling is the clip loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medclip.training import losses

# 6 examples, K = 4: 0 and 1 share a caption; 2 and 3 have the same concept set; 5 has none.
CONCEPTS = np.array([[0, 1, 2, -1], [1, 3, -1, -1], [0, 4, -1, -1], [4, 0, -1, -1], [2, 5, 6, 7],
                     [-1, -1, -1, -1]], np.int32)
GROUPS = np.array([0, 0, 1, 2, 3, 4], np.int32)


def reference(logits, concepts, groups, weight, false_negatives):
    """Sets, loops and a log-sum-exp: nothing shared with the implementation."""
    n = len(logits)
    sets = [set(int(c) for c in row if c >= 0) for row in concepts]
    overlap = np.array([[1.0 if i == j else (len(sets[i] & sets[j]) / len(sets[i] | sets[j])
                         if sets[i] | sets[j] else 0.0) for j in range(n)] for i in range(n)])
    dup = np.array([[i == j or groups[i] == groups[j] or (bool(sets[i]) and sets[i] == sets[j])
                     for j in range(n)] for i in range(n)])
    keep = np.ones((n, n), bool) if false_negatives != "mask" else ~dup | np.eye(n, dtype=bool)
    hard = dup / dup.sum(1, keepdims=True) if false_negatives == "positive" else np.eye(n)
    soft = np.where(keep, overlap, 0.0)
    targets = (1 - weight) * hard + weight * soft / soft.sum(1, keepdims=True)

    def ce(z):  # rows of z against rows of targets, only over kept columns
        total = 0.0
        for i in range(n):
            zi = z[i][keep[i]]
            log_p = zi - (np.log(np.exp(zi - zi.max()).sum()) + zi.max())
            total -= (targets[i][keep[i]] * log_p).sum()
        return total / n

    return (ce(logits) + ce(logits.T)) / 2


@pytest.mark.parametrize("false_negatives", ["positive", "mask", "none"])
@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_concept_loss_matches_numpy_reference(weight, false_negatives):
    logits = np.random.default_rng(0).normal(scale=3.0, size=(6, 6))
    got = losses.concept_loss(jnp.asarray(logits, jnp.float32), CONCEPTS, GROUPS, weight, false_negatives)
    np.testing.assert_allclose(float(got), reference(logits, CONCEPTS, GROUPS, weight, false_negatives), rtol=1e-5)


def test_jaccard_similarity():
    sim = np.asarray(losses.concept_similarity(jnp.asarray(CONCEPTS)))
    assert sim[0, 1] == pytest.approx(1 / 4) and sim[0, 2] == pytest.approx(1 / 4) and sim[2, 3] == 1.0
    assert sim[5, 5] == 0.0 and sim[0, 5] == 0.0 and np.allclose(sim, sim.T)


def test_weight_zero_without_false_negatives_is_clip():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(6, 6)), jnp.float32)
    np.testing.assert_allclose(losses.concept_loss(logits, CONCEPTS, GROUPS, 0.0, "none"),
                               losses.clip_loss(logits), rtol=1e-6)


def duplicate_pair_gradient(false_negatives, weight=0.0):
    """d loss / d logit for (text 0, image 1) and (text 1, image 0), on a batch from embeddings where texts 0
    and 1 are the same caption (so embed the same) paired with two different images."""
    rng = np.random.default_rng(2)
    image = rng.normal(size=(6, 8)).astype(np.float32)
    text = rng.normal(size=(6, 8)).astype(np.float32)
    text[1] = text[0]
    image, text = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (image, text))
    logits = jnp.asarray(10.0 * text @ image.T)
    concepts = np.full((6, 4), -1, np.int32)  # no concepts: only the caption duplicate matters
    grads = jax.grad(lambda z: losses.concept_loss(z, concepts, GROUPS, weight, false_negatives))(logits)
    return float(grads[0, 1]), float(grads[1, 0])


@pytest.mark.parametrize("weight", [0.0, 0.5])
@pytest.mark.parametrize("false_negatives", ["positive", "mask"])
def test_identical_captions_are_not_pushed_apart(false_negatives, weight):
    """A descent step must not lower the logit of a caption with the other image of the same caption. With
    plain negatives (none) it does, so the check can fail."""
    assert min(duplicate_pair_gradient("none", weight)) > 0  # pushed apart
    grads = duplicate_pair_gradient(false_negatives, weight)
    if false_negatives == "mask":
        assert grads == (0.0, 0.0)  # the pair is no negative
    else:
        assert max(grads) < 0  # pulled together: both images are the caption's positives


def test_masked_duplicates_get_no_logit_gradient():
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(6, 6)), jnp.float32)
    grads = jax.grad(lambda z: losses.concept_loss(z, CONCEPTS, GROUPS, 0.5, "mask"))(logits)
    assert grads[0, 1] == 0 and grads[1, 0] == 0 and grads[2, 3] == 0 and grads[3, 2] == 0
    assert grads[0, 2] != 0


def test_compute_loss_reads_the_batch_and_names_missing_fields():
    class Out:
        logits_per_text = jnp.asarray(np.random.default_rng(4).normal(size=(6, 6)), jnp.float32)

    config = losses.LossConfig(name="concept", concept_target_weight=0.3, false_negatives="mask")
    batch = {"concept_ids": CONCEPTS, "caption_group": GROUPS, "input_ids": np.zeros((6, 2))}
    np.testing.assert_allclose(losses.compute_loss(Out, config, batch),
                               losses.concept_loss(Out.logits_per_text, CONCEPTS, GROUPS, 0.3, "mask"))
    with pytest.raises(ValueError, match="concept_ids"):
        losses.compute_loss(Out, config, {"caption_group": GROUPS})
    with pytest.raises(ValueError, match="false_negatives"):
        losses.concept_loss(Out.logits_per_text, CONCEPTS, GROUPS, 0.3, "drop")
