"""Shared fixtures for the data tests. TF is slow to import and to trace, so fixtures are session-wide."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_DEFAULT_SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "roco-sample"  # ../shared beside the repo
ROCO_SAMPLE = Path(os.environ.get("MEDCLIP_ROCO_SAMPLE", _DEFAULT_SAMPLE))


@pytest.fixture(scope="session")
def roco_sample() -> Path:
    """../shared/roco-sample (500 real ROCO test pairs); the test is skipped when it is not there."""
    if not (ROCO_SAMPLE / "data" / "test" / "radiology" / "captions.txt").is_file():
        pytest.skip(f"ROCO sample not found at {ROCO_SAMPLE} (set MEDCLIP_ROCO_SAMPLE)")
    return ROCO_SAMPLE


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A tiny offline WordPiece tokenizer (BertTokenizerFast) covering the synthetic captions."""
    from medclip.data import synthetic

    return synthetic.write_synthetic_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def synthetic_jsonl(tmp_path_factory) -> Path:
    """40 synthetic pairs at 48 px written as PNG files + JSON lines."""
    from medclip.data import synthetic

    return synthetic.write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), n=40, seed=3, image_size=48)


@pytest.fixture(scope="session")
def synthetic_records(synthetic_jsonl):
    from medclip.data.sources import jsonl

    return jsonl.load_jsonl(synthetic_jsonl)
