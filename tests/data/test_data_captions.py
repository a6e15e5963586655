"""Caption cleaning and the minimum length rule."""

from __future__ import annotations

import pytest

from medclip.data import captions
from medclip.data.records import DropCounter


@pytest.mark.parametrize("raw, clean", [
    ("  Axial CT   of the\tchest.\n", "Axial CT of the chest."),
    ("Cafe\u0301 au lait spots", "Caf\u00e9 au lait spots"),  # NFC
    ("zero\u200bwidth and\u00a0nbsp", "zerowidth and nbsp"),
    ("b'Axial CT of the chest.'", "Axial CT of the chest."),
    ('b"It\'s a mass."', "It's a mass."),
    ("b'Patient\\xe2\\x80\\x99s knee'", "Patient\u2019s knee"),
    ("b'broken \\x escape'", "broken \\x escape"),
    ("Distension digestive avec niveaux hydro-aériques", "Distension digestive avec niveaux hydro-aériques"),
])
def test_clean_caption(raw, clean):
    assert captions.clean_caption(raw) == clean


def test_caption_problem_min_length_is_configurable():
    assert captions.caption_problem("") == "empty_caption"
    assert captions.caption_problem("OPG.") == "short_caption"
    assert captions.caption_problem("Chest X-ray") is None
    assert captions.caption_problem("OPG.", min_length=3) is None
    assert captions.caption_problem("Chest X-ray", min_length=20) == "short_caption"


def test_clean_captions_keeps_usable_ones_and_counts_unusable_records():
    counter = DropCounter()
    assert captions.clean_captions(["  ", "Axial CT of the chest."], "f:1", counter) == ["Axial CT of the chest."]
    assert captions.clean_captions(["   "], "f:2", counter) is None
    assert captions.clean_captions(["tiny"], "f:3", counter) is None
    assert captions.clean_captions([], "f:4", counter) is None
    assert dict(counter.counts) == {"empty_caption": 1, "short_caption": 1, "no_caption": 1}
