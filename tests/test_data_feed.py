"""--preprocessing_num_workers reaches both tf.data pipelines; data errors are typed."""

from __future__ import annotations

import pytest

from medclip.data.synthetic import write_synthetic_tokenizer
from medclip.models.hybrid import HybridCLIPConfig
from medclip.training.arguments import DataArguments, TrainingArguments
from medclip.training.config_check import DataError
from medclip.training.data_feed import build_data


def _feed(tmp_path, **train):
    tokenizer = write_synthetic_tokenizer(tmp_path / "tok")
    data = DataArguments(synthetic_train_samples=32, synthetic_validation_samples=8, synthetic_image_size=32,
                         max_seq_length=16, preprocessing_num_workers=2)
    args = TrainingArguments(output_dir=str(tmp_path), do_train=True, do_eval=True, **train)
    return build_data(data, args, tokenizer, HybridCLIPConfig.tiny(), tmp_path, num_devices=1)


def test_preprocessing_num_workers_sets_the_pipelines_thread_pools(tmp_path):
    feed = _feed(tmp_path, per_device_train_batch_size=8, per_device_eval_batch_size=8)
    assert feed.train.settings["threads"] == 2
    assert feed.eval.dataset().options().threading.private_threadpool_size == 2
    assert next(feed.train)["pixel_values"].shape == (8, 32, 32, 3)


def test_too_few_pairs_for_one_batch_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="32 training pairs do not fill one global batch of 64"):
        _feed(tmp_path, per_device_train_batch_size=64)
