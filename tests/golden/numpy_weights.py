"""Regenerate the weights of the `*_full` golden fixtures from their `keys.json` (pure NumPy, no torch).

The full-size reference models are too large to store, so `make_golden.py` builds them from these arrays and the
JAX tests rebuild the same arrays from the same function. `keys.json` maps each state-dict key to
`{"shape": [...], "dtype": "float32" | "int64", "role": ...}`; the seed is in the fixture's `meta.json`.

For the key at position `index` in sorted key order, with `z = np.random.default_rng([seed, index])
.standard_normal(shape)` (float32):
  role "param" with ndim >= 2 (conv / linear weights, embeddings): z * sqrt(gain / fan_in), fan_in = prod(shape[1:])
  every other key: r = z * 0.02, and the value is  "bn_weight": 1 + r;  "bn_running_var": 1 + |r|;
  "bn_num_batches_tracked": 0 (int64);  otherwise r (biases, BatchNorm bias and running_mean).
The seed and the gain are in the fixture's meta.json. A flat 0.02 for the weights too makes these deep nets
nearly blind to their input (tf_efficientnetv2_s: features change by 1e-8 when the stem kernel is flipped, far
below a 1e-4 tolerance); fan-in scaling keeps the features O(0.1-10) and sensitive to every layer.
"""

import json
from pathlib import Path

import numpy as np

SCALE = 0.02


def generate_weights(keys: dict[str, dict], seed: int, gain: float) -> dict[str, np.ndarray]:
    """`keys`: the parsed `keys.json` (key -> shape, dtype, role). Returns key -> array."""
    weights = {}
    for index, name in enumerate(sorted(keys)):
        spec = keys[name]
        shape = tuple(spec["shape"])
        role = spec["role"]
        if role == "bn_num_batches_tracked":
            weights[name] = np.zeros(shape, dtype=np.int64)
            continue
        z = np.asarray(np.random.default_rng([seed, index]).standard_normal(shape), np.float32)  # 0-d too
        if role == "param" and len(shape) >= 2:
            weights[name] = np.asarray(z * np.float32(np.sqrt(gain / np.prod(shape[1:]))), spec["dtype"])
            continue
        r = z * np.float32(SCALE)
        if role == "bn_weight":
            r = np.float32(1.0) + r
        elif role == "bn_running_var":
            r = np.float32(1.0) + np.abs(r)
        weights[name] = np.asarray(r, spec["dtype"])
    return weights


def load_fixture_weights(folder: str | Path) -> dict[str, np.ndarray]:
    """The weights of one `*_full` fixture folder (reads its keys.json, and the seed and gain in meta.json)."""
    folder = Path(folder)
    keys = json.loads((folder / "keys.json").read_text())
    meta = json.loads((folder / "meta.json").read_text())
    return generate_weights(keys, meta["seed"], meta["weight_gain"])
