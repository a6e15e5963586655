"""The scripts' TensorFlow start-up hook: TensorFlow's first import leaves Keras unimported (its eager load is a third
of TensorFlow's import time), TensorFlow works, and Keras still imports afterwards, as `tf.keras` too."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import json, sys
from medclip.quiet_imports import quiet_tensorflow_start_up
if sys.argv[1] == "hook":
    quiet_tensorflow_start_up()
import tensorflow as tf
keras_at_start = "keras" in sys.modules
doubled = [int(x) for x in tf.data.Dataset.range(3).map(lambda x: x * 2).as_numpy_iterator()]
import keras
print(json.dumps({"keras_at_start": keras_at_start, "doubled": doubled,
                  "tf_keras_is_keras": tf.keras.layers.Dense is keras.layers.Dense}))
"""


@pytest.mark.skipif(importlib.util.find_spec("keras") is None, reason="Keras is not installed")
def test_tensorflow_starts_without_keras_and_keras_still_loads_later():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    results = {}
    for mode in ("hook", "plain"):
        done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env,
                              cwd=ROOT, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    assert results["plain"]["keras_at_start"]  # what the hook prevents: TensorFlow's eager import of Keras
    assert results["hook"] == {"keras_at_start": False, "doubled": [0, 2, 4], "tf_keras_is_keras": True}
