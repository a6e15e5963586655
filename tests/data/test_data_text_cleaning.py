"""Caption cleaning options (abbreviations, stop words, one-letter words, a word list) on real ROCO captions."""

from __future__ import annotations

import pytest

from medclip.data import text_cleaning
from medclip.data.records import DropCounter, Record
from medclip.data.sources import base, roco
from medclip.data.text_cleaning import TextCleaning

ALL_ON = TextCleaning(expand_abbreviations=True, remove_stopwords=True, remove_single_letters=True,
                      remove_words=("arrow", "arrows"))

# Real ROCO test-split captions (../shared/roco-sample) and what each option leaves of them.
EXAMPLES = [
    # Abbreviations and the word list: CT expanded, "arrow" removed with what it leaves behind tidied.
    ("ROCO_02333", ALL_ON,
     "CT reconstruction image revealed a colo-urachal-cutaneous fistula (urachal-cutaneous fistula, white arrow), "
     "(colo-urachal communication, black arrow).",
     "computed tomography reconstruction image revealed colo-urachal-cutaneous fistula (urachal-cutaneous fistula, "
     "white), (colo-urachal communication, black)."),
    # "(MRI)" defines itself and stays; "FLAIR" is expanded; the negation "no" is not a stop word here.
    ("ROCO_00300", ALL_ON,
     "Brain magnetic resonance imaging (MRI) after gadolinium injection showed an image in the axial (FLAIR "
     "sequence) showing hyper-intensity lesions in the white matter of the frontal lobes. There is no signal "
     "abnormality of the cortex. Note that there is no mass effect on the ventricular cavities or midline structures.",
     "Brain magnetic resonance imaging (MRI) gadolinium injection showed image axial (fluid-attenuated inversion "
     "recovery sequence) showing hyper-intensity lesions white matter frontal lobes. no signal abnormality cortex. "
     "Note no mass effect ventricular cavities midline structures."),
    # Vertebral levels (letter + digits) are never expanded: "C4-5" stays a range.
    ("ROCO_07732", ALL_ON,
     "C4-5 Segmental lordosis: the angle between the superior endplate of C4 and the inferior endplate of C5",
     "C4-5 Segmental lordosis: angle superior endplate C4 inferior endplate C5"),
    # One-letter words alone: the labels "L" and "R" go, "T2" and "X" of "X-ray" are not words and stay.
    ("ROCO_07952", TextCleaning(remove_single_letters=True),
     "T2 turbo spin-echo weighted magnetic resonance imaging demonstrating a space-occupying lesion in the radial "
     "tunnel. L indicates lesion; R, proximal radius.",
     "T2 turbo spin-echo weighted magnetic resonance imaging demonstrating space-occupying lesion in the radial "
     "tunnel. indicates lesion; proximal radius."),
    ("ROCO_21945", TextCleaning(remove_single_letters=True),
     "Tension pneumothorax. (a) Cervical emphysema.", "Tension pneumothorax. Cervical emphysema."),
]


@pytest.fixture(scope="module")
def sample_captions(roco_sample) -> dict[str, str]:
    """id -> caption as the ROCO source cleans it (normalised, not yet text-cleaned)."""
    items = roco.load_roco(roco_sample, "test", counter=DropCounter(), check_images=False)
    return {record.id: record.captions[0] for record in items}


@pytest.mark.parametrize("roco_id, cleaning, before, after", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_real_captions_before_and_after(sample_captions, roco_id, cleaning, before, after):
    assert sample_captions[roco_id] == before
    assert cleaning.clean(before)[0] == after


def test_abbreviations_are_case_sensitive_whole_unambiguous_tokens():
    clean = TextCleaning(expand_abbreviations=True).clean
    assert clean("CT and MRI of the chest; CXR and US.")[0] == (
        "computed tomography and magnetic resonance imaging of the chest; chest x-ray and ultrasound.")
    assert clean("ct of the chest, CTA and T2-weighted MR")[0] == "ct of the chest, CTA and T2-weighted MR"
    assert clean("CT-guided biopsy")[0] == "computed tomography-guided biopsy"
    assert clean("delayed enhancement (DE) and DE in IN")[0] == "delayed enhancement (DE) and DE in IN"
    table = text_cleaning.abbreviation_table()
    assert table["CT"] == "computed tomography" and "T2" not in table and "L" not in table and "mg" not in table


def test_word_list_from_a_file_or_commas(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("# figure labels\nArrow\narrows\n\narrowhead\n", encoding="utf-8")
    assert text_cleaning.parse_word_list(str(path)) == ("arrow", "arrowhead", "arrows")
    assert text_cleaning.parse_word_list(" Arrow, arrows ,") == ("arrow", "arrows")
    assert text_cleaning.parse_word_list("") == ()
    assert text_cleaning.from_flags() is None
    cleaning = text_cleaning.from_flags(remove_words=str(path))
    assert cleaning.clean("Mass (ARROW) and arrowheads.")[0] == "Mass and arrowheads."


def test_shipped_stopwords_keep_negations():
    words = text_cleaning.stopwords()
    assert {"the", "of", "and", "a", "with"} <= words
    assert not {"no", "not", "nor", "without", "isn't"} & words
    assert len(words) == 139


def test_captions_emptied_or_shortened_are_dropped_by_reason():
    items = [Record("1", "1.jpg", ["The CT of the chest."], source="list:1"),
             Record("2", "2.jpg", ["of the and a"], source="list:2"),
             Record("3", "3.jpg", ["A B C of the liver"], source="list:3")]
    counter = DropCounter()
    kept = text_cleaning.clean_records(items, ALL_ON, counter, min_length=10)
    assert [(r.id, r.captions) for r in kept] == [("1", ["computed tomography chest."])]
    assert dict(counter.counts) == {"empty_after_cleaning": 1, "short_after_cleaning": 1}
    assert counter.summary()["changed"] == {"abbreviations_expanded": 1, "captions_changed": 3,
                                            "single_letters_removed": 2, "stopwords_removed": 10}


def test_the_counts_reach_the_data_report(roco_sample):
    counter = DropCounter()
    items = roco.load_roco(roco_sample, "test", counter=counter, check_images=False, text_cleaning=ALL_ON)
    summary = counter.summary()
    assert summary["kept"] == len(items)
    # 499 captions pass the 10-character minimum before cleaning; 449 of them change, none gets too short.
    assert summary["kept"] == 499 and summary["dropped_by_reason"] == {"short_caption": 1}
    assert summary["changed"] == {"abbreviations_expanded": 190, "captions_changed": 449,
                                  "listed_words_removed": 119, "single_letters_removed": 32,
                                  "stopwords_removed": 2785}
    assert summary["change_examples"]["captions_changed"][0].startswith('"Initial chest x-ray showing a left')
    # Off by default: the same load without cleaning changes nothing.
    plain = DropCounter()
    roco.load_roco(roco_sample, "test", counter=plain, check_images=False)
    assert plain.summary()["changed"] == {}
    with pytest.raises(TypeError):
        base.LoadOptions(text_cleanup=True)
