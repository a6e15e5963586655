"""The tf.data train/eval pipelines: shapes, determinism, sharding, exact resume, eval padding, bad images."""

from __future__ import annotations

import numpy as np
import pytest

from medclip.data import pipeline
from medclip.data.fields import Field, ImageFeatures, second_text
from medclip.data.records import DataError, DropCounter, Record
from tests.data import bad_files

SIZE, LENGTH = 24, 16


def train(items, tokenizer, train_crop="random", **kwargs):
    settings = dict(global_batch_size=8, seed=0, process_index=0, process_count=1,
                    image=pipeline.ImageSettings(size=SIZE, train_crop=train_crop))
    captions = pipeline.tokenize_captions(items, tokenizer, LENGTH)
    return pipeline.make_train_dataset(items, captions, **{**settings, **kwargs})


def evaluation(items, tokenizer, **kwargs):
    settings = dict(global_batch_size=8, process_index=0, process_count=1, image=pipeline.ImageSettings(size=SIZE))
    captions = pipeline.tokenize_captions(items, tokenizer, LENGTH)
    return pipeline.make_eval_dataset(items, captions, **{**settings, **kwargs})


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_train_batches_shapes_and_dtypes(synthetic_records, tokenizer):
    batch = next(train(synthetic_records, tokenizer))
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask"}
    assert batch["pixel_values"].shape == (8, SIZE, SIZE, 3) and batch["pixel_values"].dtype == np.float32
    assert batch["input_ids"].shape == (8, LENGTH) and batch["input_ids"].dtype == np.int32
    assert batch["attention_mask"].dtype == np.int32 and batch["attention_mask"][:, 0].all()
    assert -2.5 < batch["pixel_values"].min() and batch["pixel_values"].max() < 2.7  # CLIP-normalised range


def test_tokenized_once_to_max_seq_length(synthetic_records, tokenizer):
    multi = Record("multi", synthetic_records[3].image, ["First caption here.", "Second one."])
    items = synthetic_records[:3] + [multi]
    captions = pipeline.tokenize_captions(items, tokenizer, LENGTH)
    assert captions.input_ids.shape == (5, LENGTH)
    assert list(captions.first) == [0, 1, 2, 3] and list(captions.count) == [1, 1, 1, 2]
    expected = tokenizer("Second one.", padding="max_length", max_length=LENGTH)["input_ids"]
    assert list(captions.input_ids[4]) == expected


def test_train_is_deterministic_from_the_seed(synthetic_records, tokenizer):
    first = take(train(synthetic_records, tokenizer), 2)
    assert_same_batches(first, take(train(synthetic_records, tokenizer), 2))
    other = take(train(synthetic_records, tokenizer, seed=1), 2)
    assert not np.array_equal(first[0]["input_ids"], other[0]["input_ids"])


def test_epochs_drop_the_partial_batch_and_see_each_record_once(synthetic_records, tokenizer):
    items = synthetic_records[:21]  # 21 records, batch 8: 2 steps per epoch, 5 records left out each epoch
    iterator = train(items, tokenizer)
    assert iterator.steps_per_epoch == 2
    layout = iterator.layout
    for epoch in range(3):
        order = pipeline.epoch_order(0, epoch, layout)
        assert len(order) == 16 and len(set(order)) == 16
    assert not np.array_equal(pipeline.epoch_order(0, 0, layout), pipeline.epoch_order(0, 1, layout))


def test_processes_split_each_global_batch(synthetic_records, tokenizer):
    single = take(train(synthetic_records, tokenizer), 3)
    halves = [take(train(synthetic_records, tokenizer, process_index=i, process_count=2), 3) for i in range(2)]
    for step in range(3):
        assert halves[0][step]["pixel_values"].shape[0] == 4
        for key in single[step]:
            joined = np.concatenate([halves[0][step][key], halves[1][step][key]])
            np.testing.assert_allclose(joined, single[step][key], atol=1e-5, err_msg=key)


def test_restore_gives_the_identical_next_batches(synthetic_records, tokenizer):
    iterator = train(synthetic_records, tokenizer)
    take(iterator, 4)  # 40 records / 8 = 5 steps per epoch: the next batches cross into epoch 1
    state = iterator.state()
    expected = take(iterator, 3)
    restored = train(synthetic_records, tokenizer)
    restored.restore(state)
    assert_same_batches(take(restored, 3), expected)
    with pytest.raises(ValueError, match="other data or settings"):
        train(synthetic_records[:-1], tokenizer).restore(state)


def test_eval_counts_every_example_exactly_once(synthetic_records, tokenizer):
    items = synthetic_records[:21]
    seen = []
    batches_per_process = []
    for process in range(2):
        dataset = evaluation(items, tokenizer, process_index=process, process_count=2)
        batches = list(dataset)
        batches_per_process.append(len(batches))
        assert len(batches) == len(dataset) == 3  # ceil(21 / 8)
        for batch in batches:
            assert batch["pixel_values"].shape == (4, SIZE, SIZE, 3) and batch["mask"].dtype == bool
            seen += [tuple(ids) for ids in batch["input_ids"][batch["mask"]]]
    assert batches_per_process[0] == batches_per_process[1]
    assert len(seen) == 21
    expected = pipeline.tokenize_captions(items, tokenizer, LENGTH).input_ids
    assert sorted(seen) == sorted(tuple(ids) for ids in expected)


def test_eval_is_deterministic(synthetic_records, tokenizer):
    dataset = evaluation(synthetic_records[:10], tokenizer)
    assert_same_batches(list(dataset), list(dataset))


def test_records_holding_bytes(synthetic_records, tokenizer, tmp_path):
    from pathlib import Path

    in_memory = [Record(r.id, Path(r.image).read_bytes(), r.captions) for r in synthetic_records[:16]]
    from_bytes = take(train(in_memory, tokenizer), 2)
    from_files = take(train(synthetic_records[:16], tokenizer), 2)
    assert_same_batches(from_bytes, from_files)


def _with_corrupt_image(tmp_path, synthetic_records):
    """Records where one image cannot be decoded (a truncated JPEG that reached the graph unchecked)."""
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(bad_files.jpeg_bytes(size=(96, 96))[:-300])
    bad = Record("corrupt", str(corrupt), ["A caption that is long enough."], source="corrupt.jsonl:7")
    return synthetic_records[:8] + [bad] + synthetic_records[8:16]


def test_undecodable_image_in_training_is_skipped_and_counted(synthetic_records, tokenizer, tmp_path):
    items = _with_corrupt_image(tmp_path, synthetic_records)
    counter = DropCounter()
    iterator = train(items, tokenizer, global_batch_size=4, counter=counter)
    take(iterator, 12)  # three epochs of 17 records: the corrupt one comes up every epoch, counted once
    assert dict(counter.counts) == {"corrupt_image": 1}
    assert "corrupt.jsonl:7: corrupt_image" in counter.examples["corrupt_image"][0]
    strict = train(items, tokenizer, global_batch_size=4, counter=DropCounter(strict=True))
    with pytest.raises(DataError, match="corrupt.jsonl:7"):
        take(strict, 12)


def test_undecodable_image_in_eval_is_counted_not_lost(synthetic_records, tokenizer, tmp_path):
    items = _with_corrupt_image(tmp_path, synthetic_records)
    counter = DropCounter()
    dataset = evaluation(items, tokenizer, counter=counter)
    batches = list(dataset)
    assert len(batches) == 3 and sum(int(b["mask"].sum()) for b in batches) == len(items) - 1
    assert dict(counter.counts) == {"corrupt_image": 1}


def test_vision_image_size():
    class Vision:
        image_size = 64

    class DualEncoder:
        vision_config = Vision()

    assert pipeline.vision_image_size(DualEncoder()) == 64
    assert pipeline.vision_image_size({"image_size": 96}) == 96


def test_batch_must_divide_over_processes(synthetic_records, tokenizer):
    with pytest.raises(ValueError, match="divide evenly"):
        train(synthetic_records, tokenizer, global_batch_size=9, process_count=2)


def test_concept_fields_in_train_batches(synthetic_records, tokenizer):
    """concept_ids: the record's concepts as ids of the training vocabulary (concepts in >= 2 records, the
    most frequent kept when cut to K), -1 padding; caption_group: equal for equal normalised captions."""
    import dataclasses

    from medclip.data.concepts import ConceptVocabulary, concept_field

    items = [dataclasses.replace(r, concepts=[f"C{i % 3}", f"C{i % 5 + 10}", f"U{i}"], id=f"r{i}")
             for i, r in enumerate(synthetic_records[:16])]
    items[1] = dataclasses.replace(items[1], captions=[items[0].captions[0].upper() + " ."])
    counter = DropCounter()
    vocab = ConceptVocabulary.build(items)
    iterator = train(items, tokenizer, fields=[concept_field(items, vocab, 2, counter)], global_batch_size=16,
                     counter=counter)
    batch = next(iterator)
    assert batch["concept_ids"].shape == (16, 2) and batch["concept_ids"].dtype == np.int32
    assert batch["caption_group"].shape == (16,) and batch["caption_group"].dtype == np.int32
    assert "U3" not in vocab.ids and len(vocab) == 8  # singletons out: C0-C2, C10-C14
    ids = vocab.ids
    assert len(set(batch["caption_group"])) == 15  # records 0 and 1 share their normalised caption
    for row in batch["concept_ids"]:  # each batch row is some record's two known concepts, ascending
        assert row[0] < row[1] and set(row) <= set(ids.values())
    expected = {tuple(sorted(ids[c] for c in r.concepts if c in ids)) for r in items}
    assert {tuple(row) for row in batch["concept_ids"]} == expected
    assert counter.summary()["changed"] == {"concept_set_truncated": 0}
    counter = DropCounter()
    cut = train(items, tokenizer, fields=[concept_field(items, vocab, 1, counter)], global_batch_size=16,
                counter=counter)
    assert cut.counter.summary()["changed"] == {"concept_set_truncated": 16}
    assert set(next(cut)) == {"pixel_values", "input_ids", "attention_mask", "concept_ids", "caption_group"}


def test_semantic_types_as_the_concept_source(synthetic_records, tokenizer):
    """--concept_source: the same vocabulary and ids machinery over the records' semantic types, or the union."""
    import dataclasses

    from medclip.data.concepts import ConceptVocabulary, concept_field, concept_set

    items = [dataclasses.replace(r, concepts=[f"C{i % 4}"], semantic_types=["T033", f"T0{60 + i % 2}"], id=f"r{i}")
             for i, r in enumerate(synthetic_records[:16])]
    assert ConceptVocabulary.build(items, source="semtypes").ids == {"T033": 0, "T060": 1, "T061": 2}
    assert set(ConceptVocabulary.build(items, source="both").ids) == {"T033", "T060", "T061", "C0", "C1", "C2", "C3"}
    assert concept_set(items[1], "both") == ["C1", "T033", "T061"]
    with pytest.raises(ValueError, match="concept source"):
        concept_set(items[0], "keywords")
    field = concept_field(items, ConceptVocabulary.build(items, source="semtypes"), 4)
    batch = next(train(items, tokenizer, fields=[field], global_batch_size=16))
    assert {tuple(row[row >= 0]) for row in batch["concept_ids"]} == {(0, 1), (0, 2)}


def test_center_train_crop_is_evaluations_image(synthetic_records, tokenizer):
    """--train_crop center: training pixels are exactly what evaluation (and the image cache) decode."""
    items = synthetic_records[:8]
    batch = next(train(items, tokenizer, train_crop="center"))
    (indices, pixels), = pipeline.decoded_eval_images(items, image_size=SIZE, batch_size=8)
    assert sorted(indices) == list(range(8))
    for row in batch["pixel_values"]:  # a shuffled epoch: each row is one record's evaluation image
        assert min(np.abs(pixels - row).max(axis=(1, 2, 3))) == 0
    random = next(train(items, tokenizer))
    assert min(np.abs(pixels - random["pixel_values"][0]).max(axis=(1, 2, 3))) > 0
    with pytest.raises(ValueError, match="train_crop"):
        next(train(items, tokenizer, train_crop="middle"))


def test_cached_image_features_replace_pixels_and_undecodable_ones_are_skipped(synthetic_records, tokenizer,
                                                                               tmp_path):
    items = _with_corrupt_image(tmp_path, synthetic_records)  # record 8 does not decode
    decoded = np.concatenate([i for i, _ in pipeline.decoded_eval_images(items, image_size=SIZE, batch_size=4)])
    assert sorted(decoded) == [i for i in range(len(items)) if i != 8]
    valid = np.zeros(len(items), bool)
    valid[decoded] = True
    features = np.repeat(np.arange(len(items), dtype=np.float32)[:, None], 3, axis=1)  # row i holds i
    counter = DropCounter()
    iterator = train(items, tokenizer, global_batch_size=4, counter=counter, train_crop="center",
                     fields=[ImageFeatures(features, valid).field()])
    batches = take(iterator, 12)  # three epochs of 17 records
    assert set(batches[0]) == {"image_pooled", "input_ids", "attention_mask"}
    seen = np.concatenate([b["image_pooled"][:, 0] for b in batches]).astype(int)
    assert 8 not in seen and set(seen) == set(decoded)
    captions = pipeline.tokenize_captions(items, tokenizer, LENGTH)
    ids = np.concatenate([b["input_ids"] for b in batches])
    for record, row in zip(seen, ids):  # each row's features and caption belong to the same record
        own = captions.input_ids[captions.first[record]:captions.first[record] + captions.count[record]]
        assert (own == row).all(axis=1).any()
    assert dict(counter.counts) == {"corrupt_image": 1}
    assert "corrupt.jsonl:7: corrupt_image" in counter.examples["corrupt_image"][0]


def test_fields_add_their_keys_per_record_and_per_caption_row(synthetic_records, tokenizer):
    """A field's per-record array follows the example's record, its per-caption array the caption drawn, in
    training and evaluation; a wrong row count or a key given twice is refused."""
    multi = Record("multi", synthetic_records[7].image, ["First caption here.", "Second one."])
    items = synthetic_records[:7] + [multi]
    captions = pipeline.tokenize_captions(items, tokenizer, LENGTH)
    tag = Field(per_record={"record": np.arange(8, dtype=np.int32)},
                per_caption={"row": np.arange(9, dtype=np.int32)})
    for batch in take(train(items, tokenizer, fields=[tag]), 3):
        for record, row, ids in zip(batch["record"], batch["row"], batch["input_ids"]):
            assert captions.first[record] <= row < captions.first[record] + captions.count[record]
            np.testing.assert_array_equal(ids, captions.input_ids[row])
    import dataclasses

    second = second_text(items, tokenizer, LENGTH, "keywords")
    five = [dataclasses.replace(r, keywords=[r.captions[0]]) for r in synthetic_records[:5]]
    batch = next(iter(evaluation(five, tokenizer, fields=[second_text(five, tokenizer, LENGTH, "keywords")])))
    np.testing.assert_array_equal(batch["second_input_ids"][:5], batch["input_ids"][:5])
    assert not batch["mask"][5:].any()
    with pytest.raises(ValueError, match="7 rows for 8"):
        train(items, tokenizer, fields=[Field(per_record={"x": np.zeros(7)})])
    with pytest.raises(ValueError, match="second_input_ids"):
        train(items, tokenizer, fields=[second, second])
