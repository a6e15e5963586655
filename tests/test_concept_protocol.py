"""Named prompt sets and the CLIP-TF report's zero-shot classification by concepts (`medclip evaluate --protocol
clip-tf-report`): classes are the most frequent CUIs written by name in "A photo of a {}.", right when the
predicted class is among the image's concepts. The command-line tests are in test_cli_tools.py (its model)."""

from __future__ import annotations

import numpy as np
import pytest

from medclip.evaluation.concept_zeroshot import concept_zero_shot, format_report_table
from medclip.evaluation.prompts import PROMPT_SETS, PromptSetError, prompt_set

NAMES = {"C1": "computed tomography", "C2": "plain x-ray", "C3": "ultrasound"}


def test_prompt_sets_are_the_sources_templates():
    clip = prompt_set("clip")
    assert len(clip) == 80 and len(set(clip)) == 80 and all(t.count("{}") == 1 for t in clip)
    assert (clip[0], clip[-1]) == ("a bad photo of a {}.", "a tattoo of the {}.")  # open_clip's order
    assert prompt_set("biomedclip") == ("this is a photo of {}",)
    assert prompt_set("clip-tf-report") == ("A photo of a {}.",)
    assert "radiology" in PROMPT_SETS
    with pytest.raises(PromptSetError, match="choose from"):
        prompt_set("imagenet")


class NameEncoder:
    """Prompt -> the unit axis of the class name it holds (images are built on the same axes)."""

    def __init__(self):
        self.prompts = []

    def __call__(self, prompts):
        self.prompts += prompts
        axes = {name: i for i, name in enumerate(sorted(NAMES.values()))}
        out = np.zeros((len(prompts), 4))
        for row, prompt in enumerate(prompts):
            out[row, [axes[n] for n in axes if n in prompt][0]] = 1.0
        return out


def test_concept_zero_shot_counts_a_prediction_among_the_images_concepts():
    axes = {cui: sorted(NAMES.values()).index(name) for cui, name in NAMES.items()}
    concepts = [["C1"], ["C1", "C2"], ["C2"], ["C1"], ["C3"], ["C2", "C3"]]
    looks_like = ["C1", "C2", "C1", "C1", "C3", "C3"]  # image 1: x-ray (among its concepts); image 2: CT (wrong)
    images = np.eye(4)[[axes[c] for c in looks_like]] + 0.01
    encoder = NameEncoder()
    result = concept_zero_shot(images, concepts, encoder, NAMES, ks=(2, 3, 5))
    assert encoder.prompts[:2] == ["A photo of a computed tomography.", "A photo of a plain x-ray."]
    assert result["skipped_ks"] == [5]  # only three distinct concepts
    two = result["ks"][2]  # C1 and C2 (3 images each, ties by name): images 0-3 and 5 take part
    assert two["n_images"] == 5 and two["top1_in_labels"] == pytest.approx(3 / 5)  # 0, 1, 3 right
    three = result["ks"][3]
    assert three["n_images"] == 6 and three["top1_in_labels"] == pytest.approx(5 / 6)  # only image 2 wrong
    table = format_report_table(result)
    assert table.splitlines()[1].split() == ["classes", "2", "3"]
    assert table.splitlines()[2].split() == ["accuracy", "%", "60.00", "83.33"]
    assert "computed tomography (C1), plain x-ray (C2), ultrasound (C3)" in table and "our reading" in table


def test_unnamed_concepts_are_written_as_codes_and_said():
    result = concept_zero_shot(np.eye(2), [["C1"], ["C9"]], lambda p: np.eye(2)[[0 if "C1" in x else 1 for x in p]],
                               {}, ks=(2,))
    assert result["ks"][2]["top1_in_labels"] == 1.0 and result["unnamed"] == 2
    assert "2 of them have no name" in format_report_table(result)
    with pytest.raises(ValueError, match="at least 2"):
        concept_zero_shot(np.eye(2), [["C1"], ["C1"]], lambda p: np.eye(2)[: len(p)], {})
