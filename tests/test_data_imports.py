"""The light parts of medclip.data (records, sources, prepare) import without TensorFlow; the rest import at all."""

from __future__ import annotations

import subprocess
import sys


def test_light_modules_do_not_import_tensorflow():
    code = ("import sys, medclip.data.prepare, medclip.data.sources.roco, medclip.data.sources.csv_source, "
            "medclip.data.sources.jsonl, medclip.data.sources.hf_datasets, medclip.data.captions, "
            "medclip.data.shard_verify, medclip.data.sources.tfds_source; "
            "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_public_modules_import():
    from medclip.data import images, pipeline, prepare, synthetic  # noqa: F401
    from medclip.data.sources import tfds_roco  # noqa: F401

    assert callable(pipeline.make_train_dataset) and callable(pipeline.make_eval_dataset)
    assert callable(prepare.main) and callable(synthetic.write_synthetic_dataset)
