"""Zero-shot classification on synthetic embeddings whose right answers are known."""

import numpy as np
import pytest

from medclip.evaluation.roco_labels import (
    ANGIOGRAPHY,
    COMPUTED_TOMOGRAPHY,
    MRI,
    PET,
    PLAIN_XRAY,
    ULTRASOUND,
    modality_labels,
    read_roco_lists,
)
from medclip.evaluation.zeroshot import (
    average_precision,
    build_concept_task,
    class_embeddings,
    evaluate_concept_tasks,
    evaluate_zero_shot,
    format_zero_shot_table,
    most_frequent_concepts,
    multilabel_metrics,
    top1_accuracy,
)

CLASSES = ["computed tomography", "plain x-ray", "ultrasound", "angiography"]
TEMPLATES = ["a radiology image showing {}.", "a {} scan.", "{}."]
DIM = 16


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class FakeTextEncoder:
    """Prompt -> unit(class axis + 0.5 * template axis): the class axes are what images align with."""

    def __init__(self, classes=CLASSES, templates=TEMPLATES):
        self.basis = np.eye(DIM)
        self.lookup = {
            template.format(name): (c, len(classes) + t)
            for c, name in enumerate(classes)
            for t, template in enumerate(templates)
        }
        self.calls = []

    def __call__(self, prompts):
        self.calls.append(list(prompts))
        axes = [self.lookup[p] for p in prompts]
        return np.stack([_unit(self.basis[c] + 0.5 * self.basis[t]) for c, t in axes])


def test_class_embeddings_average_normalised_templates():
    encoder = FakeTextEncoder()
    embeds = class_embeddings(CLASSES, encoder, TEMPLATES)
    assert encoder.calls[0][:3] == [
        "a radiology image showing computed tomography.",
        "a computed tomography scan.",
        "computed tomography.",
    ]
    assert len(encoder.calls) == 1  # one batched call, class-major
    # Mean of unit(v_c + 0.5 w_t) over 3 orthogonal template axes, renormalised:
    # direction v_c + (0.5 / 3) * (w_0 + w_1 + w_2).
    expected = np.zeros(DIM)
    expected[0], expected[len(CLASSES) : len(CLASSES) + 3] = 1.0, 0.5 / 3
    np.testing.assert_allclose(embeds[0], _unit(expected), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(embeds, axis=1), 1.0, atol=1e-6)


def test_class_embeddings_renormalise_unnormalised_encoder_output():
    encoder = FakeTextEncoder()
    scaled = class_embeddings(CLASSES, lambda p: 7.0 * encoder(p), TEMPLATES)
    np.testing.assert_allclose(scaled, class_embeddings(CLASSES, encoder, TEMPLATES), atol=1e-6)


def test_class_embeddings_errors():
    with pytest.raises(ValueError, match="must contain '{}' exactly once"):
        class_embeddings(CLASSES, FakeTextEncoder(), ["no placeholder"])
    with pytest.raises(ValueError, match=r"returned shape \(2, 16\) for 12 prompts"):
        class_embeddings(CLASSES, lambda p: np.eye(DIM)[:2], TEMPLATES)


def test_top1_accuracy_and_tie_rule():
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
    assert top1_accuracy(scores, np.array([0, 1, 1, 0])) == 0.75  # row 3 ties -> class 0
    assert np.isnan(top1_accuracy(scores[:0], np.array([], int)))


def test_average_precision_hand_computed():
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx((1 + 2 / 3) / 2)
    # Tied top scores form one threshold: precision 1/2 at recall 1/2, then 2/3 at recall 1.
    assert average_precision([0.5, 0.5, 0.1], [0, 1, 1]) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert average_precision([0.5, 0.5, 0.1], [1, 0, 1]) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert np.isnan(average_precision([0.3, 0.2], [0, 0]))


def test_average_precision_matches_sklearn_with_ties():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 6, 40) / 5.0  # many ties
        positives = rng.random(40) < 0.3
        if positives.any():
            assert average_precision(scores, positives) == pytest.approx(
                metrics.average_precision_score(positives, scores)
            )


def test_multilabel_metrics():
    targets = np.array([[1, 0, 0], [0, 1, 1], [1, 1, 0], [0, 0, 0]], bool)
    scores = np.array([[0.9, 0.1, 0.0], [0.1, 0.2, 0.7], [0.3, 0.6, 0.1], [0.8, 0.1, 0.1]])
    metrics = multilabel_metrics(scores, targets)
    assert metrics["top1_in_labels"] == 0.75  # last image has no label: its top-1 is wrong
    ap_class0 = average_precision(scores[:, 0], targets[:, 0])  # 0.9 +, 0.8 -, 0.3 +
    assert ap_class0 == pytest.approx((1 + 2 / 3) / 2)
    assert metrics["mAP"] == pytest.approx((ap_class0 + 1.0 + 1.0) / 3)


def test_most_frequent_concepts_and_task():
    labels = [{"ct"}, {"mri"}, ["ct", "xray", "ct"], {"us"}, {"ct"}, {"xray"}, set()]
    assert most_frequent_concepts(labels, 2) == ["ct", "xray"]
    assert most_frequent_concepts(labels, 4) == ["ct", "xray", "mri", "us"]  # count ties by name
    assert most_frequent_concepts(labels, 2, exclude=["ct"]) == ["xray", "mri"]
    with pytest.raises(ValueError, match="k=5 concepts but the images carry 4"):
        most_frequent_concepts(labels, 5)

    task = build_concept_task(labels, 2, class_names={"ct": "computed tomography"})
    assert task.concepts == ("ct", "xray")
    assert task.class_names == ("computed tomography", "xray")
    np.testing.assert_array_equal(task.image_indices, [0, 2, 4, 5])  # only images with ct or xray
    np.testing.assert_array_equal(task.targets, [[1, 0], [1, 1], [1, 0], [0, 1]])
    np.testing.assert_array_equal(task.single_label, [True, False, True, True])


def _images_for(labels_per_image):
    """Image embedding = unit(sum of its classes' axes, first label weighted most)."""
    rows = []
    for labels in labels_per_image:
        v = np.zeros(DIM)
        for weight, name in zip((1.0, 0.8, 0.6), labels):
            v[CLASSES.index(name)] += weight
        rows.append(_unit(v))
    return np.stack(rows)


def test_evaluate_zero_shot_known_answers():
    labels = [["computed tomography"], ["plain x-ray"], ["computed tomography"], ["ultrasound"],
              ["plain x-ray", "computed tomography"], ["angiography"], ["ultrasound"]]
    images = _images_for(labels)
    images[3] = _images_for([["plain x-ray"]])[0]  # an ultrasound image that looks exactly like an x-ray
    task = build_concept_task(labels, 3)
    assert task.concepts == ("computed tomography", "plain x-ray", "ultrasound")
    np.testing.assert_array_equal(task.image_indices, [0, 1, 2, 3, 4, 6])  # angiography image left out
    result = evaluate_zero_shot(images, task, FakeTextEncoder(), TEMPLATES)
    assert result["K"] == 3 and result["n_images"] == 6 and result["n_single_label"] == 5
    assert result["acc"] == 0.8  # 4 of 5 single-label images right (image 3 is called x-ray)
    assert result["top1_in_labels"] == pytest.approx(5 / 6)  # the x-ray+CT image's top-1 is x-ray: right
    # AP per class. CT: its 3 images score highest -> 1. X-ray: image 3 ties with x-ray image 1 at the top
    # (precision 1/2 at recall 1/2), then the mixed image (2/3 at recall 1). Ultrasound: image 6 first,
    # then image 3 ties with the 4 other images at score 0 (precision 2/6 at recall 1).
    ap = [1.0, 0.5 * 0.5 + 0.5 * 2 / 3, 0.5 * 1 + 0.5 * 2 / 6]
    assert result["mAP"] == pytest.approx(np.mean(ap))


def test_evaluate_concept_tasks_and_table():
    rng = np.random.default_rng(0)
    names = rng.choice(CLASSES, size=40, p=[0.4, 0.3, 0.2, 0.1])
    labels = [[n] for n in names]
    results = evaluate_concept_tasks(
        _images_for(labels), labels, FakeTextEncoder(), ks=(2, 4), templates=TEMPLATES
    )
    assert list(results) == [2, 4]
    assert results[4]["n_images"] == 40 and results[4]["acc"] == 1.0 and results[4]["mAP"] == 1.0
    assert results[2]["n_images"] == sum(n in ("computed tomography", "plain x-ray") for n in names)
    table = format_zero_shot_table(results).splitlines()
    assert table[0].split() == ["K", "images", "single", "acc%", "top1_in%", "mAP%"]
    assert table[2].split()[-3:] == ["100.00", "100.00", "100.00"]
    assert len(set(map(len, table))) == 1


@pytest.mark.parametrize(
    "caption, keywords, cuis, expected",
    [
        ("Axial CT scan of the chest.", [], [], {COMPUTED_TOMOGRAPHY}),
        ("Contrast-enhanced computed tomogram of the abdomen.", [], [], {COMPUTED_TOMOGRAPHY}),
        ("Initial chest x-ray showing a pneumothorax.", [], [], {PLAIN_XRAY}),
        ("", ["postoperative", "xray"], [], {PLAIN_XRAY}),
        ("Axial T2-weighted image of the knee.", [], [], {MRI}),
        ("Reformatted CT angiography image.", [], [], {COMPUTED_TOMOGRAPHY, ANGIOGRAPHY}),
        ("Axial fused PET-CT showing uptake.", [], [], {PET, COMPUTED_TOMOGRAPHY}),
        ("Transthoracic echocardiography, four-chamber view.", [], [], {ULTRASOUND}),
        ("Post-op ERCP cholangiogram.", [], [], set()),  # not angiography
        ("Severe MR on colour flow.", [], [], set()),  # mitral regurgitation, not MRI
        ("Coronal image.", ["tomography"], ["C0024485"], {MRI}),  # CUI only
        ("", [], ["C0000726", "C0041618"], {ULTRASOUND}),
    ],
)
def test_modality_labels(caption, keywords, cuis, expected):
    assert modality_labels(caption, keywords, cuis) == expected


def test_read_roco_lists(tmp_path):
    path = tmp_path / "cuis.txt"
    path.write_text("ROCO_00001\t\tC0040405\tC0817096\n\nROCO_00002\tct\tchest \nROCO_00003\t\n")
    assert read_roco_lists(path) == {
        "ROCO_00001": ["C0040405", "C0817096"],
        "ROCO_00002": ["ct", "chest"],
        "ROCO_00003": [],
    }
    path.write_text("ROCO_00001\tC1\nROCO_00001\tC2\n")
    with pytest.raises(ValueError, match=r"cuis.txt:2 repeats image id ROCO_00001"):
        read_roco_lists(path)
