"""One folder cut into train / validation / test parts, as the CLIP-TF report does (68 / 12 / 20: a 80 / 20
train-test split, then 15% of the training part for validation).

    parts = split_records(items, parse_ratios("68,12,20"), seed=42)   # {"train": [...], "validation": [...], ...}

The cut is a seeded permutation of the records in the order the source lists them, so the same data, ratios and
seed give the same parts on every machine; each part keeps the source's order. The report's own cut (scikit-learn's
shuffles with its seed) cannot be reproduced record for record.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")


class SplitError(ValueError):
    """Ratios that do not describe three parts."""


def parse_ratios(text: str) -> tuple[float, float, float]:
    """"68,12,20" (any positive scale: 0.68,0.12,0.2 too) -> the three shares, summing to 1. The test share may
    be 0; train and validation may not."""
    try:
        values = [float(part) for part in text.replace("/", ",").split(",")]
    except ValueError:
        raise SplitError(f"--split_ratios {text!r}: expected three numbers train,validation,test, e.g. 68,12,20") \
            from None
    if len(values) != 3 or min(values) < 0 or values[0] <= 0 or values[1] <= 0:
        raise SplitError(f"--split_ratios {text!r}: expected three numbers train,validation,test with train and "
                         "validation > 0, e.g. 68,12,20")
    total = sum(values)
    return values[0] / total, values[1] / total, values[2] / total


def split_records(items: Sequence[T], ratios: tuple[float, float, float], seed: int) -> dict[str, list[T]]:
    """The three parts (train gets what rounding leaves); every item lands in exactly one."""
    n = len(items)
    n_validation = int(round(n * ratios[1]))
    n_test = int(round(n * ratios[2]))
    n_train = n - n_validation - n_test
    if n and (n_train < 1 or n_validation < 1):
        raise SplitError(f"{n} records cannot be cut {ratios} with a non-empty train and validation part")
    order = np.random.default_rng(seed).permutation(n)
    bounds = {"train": order[:n_train], "validation": order[n_train:n_train + n_validation],
              "test": order[n_train + n_validation:]}
    return {part: [items[i] for i in sorted(indices)] for part, indices in bounds.items()}
