"""A prepared TFDS dataset as records: `medclip prepare --source tfds:NAME[/CONFIG][:VERSION] --tfds_data_dir DIR`.

NAME[/CONFIG][:VERSION] is TFDS's own spelling (as `tfds.builder` and `tfds.load` take it); our ROCO builder
(`tfds_roco`, name `roco`, configs radiology and all) is registered first. The dataset is read from `data_dir`
(default TFDS's own: $TFDS_DATA_DIR, else ~/tensorflow_datasets) and never downloaded here: a dataset not prepared
there is a one-line error saying so.

Images are taken as stored (the encoded bytes, not decoded) and go through the checks every source's do; the
captions come from `captions` or `caption` (or `caption_column`), the ids from `id` (else the row's number),
concepts and keywords where the dataset has them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medclip.data import captions as caption_cleaning
from medclip.data import records
from medclip.data.records import DropCounter, Record
from medclip.data.sources import base

PREFIX = "tfds:"
CAPTION_FEATURES = ("captions", "caption")


class TfdsSourceError(records.DataError):
    """A TFDS name, config or data folder that gives no dataset to read; one line naming it."""


def is_tfds(source: Any) -> bool:
    return isinstance(source, str) and source.startswith(PREFIX)


def open_builder(source: str, data_dir: str | None = None):
    """The prepared builder `source` ("tfds:NAME[/CONFIG][:VERSION]") names in `data_dir`."""
    import tensorflow_datasets as tfds

    from medclip.data.sources import tfds_roco  # noqa: F401  (registers the `roco` builder)

    name = source[len(PREFIX):] if is_tfds(source) else source
    where = f" in {data_dir}" if data_dir else " in TFDS's default data dir"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        prepared = builder.is_prepared()
    except (ValueError, OSError, KeyError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TfdsSourceError(f"{source}: no such TFDS dataset{where} ({message})") from None
    if not prepared:
        raise TfdsSourceError(f"{source}: not prepared{where} ({builder.data_path} holds no dataset_info.json); "
                              "build it first (`builder.download_and_prepare()`), or pass --tfds_data_dir")
    return builder


def split_names(builder) -> list[str]:
    return list(builder.info.splits)


def _text_list(value) -> list[str]:
    if isinstance(value, bytes):
        return [value.decode("utf-8")]
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in np.asarray(value).reshape(-1).tolist()]


def read_builder(builder, split: str, counter: DropCounter, *, image_column: str | None = None,
                 caption_column: str | None = None,
                 min_caption_length: int = caption_cleaning.DEFAULT_MIN_CAPTION_LENGTH) -> list[Record]:
    """Records of one split (image bytes as stored), captions cleaned; nothing else checked."""
    import tensorflow_datasets as tfds

    name = f"{builder.name}/{builder.builder_config.name}" if builder.builder_config else builder.name
    if split not in builder.info.splits:
        raise TfdsSourceError(f"tfds:{name}: no split {split!r} (has: {', '.join(builder.info.splits)})")
    features = builder.info.features
    image_column = image_column or "image"
    caption_column = caption_column or next((c for c in CAPTION_FEATURES if c in features), CAPTION_FEATURES[0])
    for column in (image_column, caption_column):
        if column not in features:
            raise TfdsSourceError(f"tfds:{name} has no feature {column!r}; its features are {list(features)} "
                                  "(name them with --image_column / --caption_column)")
    decoders = {image_column: tfds.decode.SkipDecoding()} if isinstance(features[image_column],
                                                                         tfds.features.Image) else None
    dataset = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
    items = []
    for row, example in enumerate(dataset.as_numpy_iterator()):
        record_id = example["id"].decode("utf-8") if "id" in example else str(row)
        where = f"tfds {name}[{split}]:{record_id}"
        cleaned = caption_cleaning.clean_captions(_text_list(example[caption_column]), where, counter,
                                                  min_caption_length)
        if cleaned is None:
            continue
        image = example[image_column]
        if not isinstance(image, bytes) or not image:
            counter.drop(records.MISSING_FILE, where, "no encoded image bytes in the example")
            continue
        items.append(Record(id=record_id, image=image, captions=cleaned,
                            concepts=_text_list(example["concepts"]) if "concepts" in example else [],
                            keywords=_text_list(example["keywords"]) if "keywords" in example else [],
                            source=where))
    return items


def load_tfds(source: str, split: str = "train", *, data_dir: str | None = None, image_column: str | None = None,
              caption_column: str | None = None, counter: DropCounter | None = None, **options: Any) -> list[Record]:
    """One split of a prepared TFDS dataset, checked like any source's; `options` are `base.LoadOptions`."""
    builder = open_builder(source, data_dir)

    def read(counter: DropCounter, min_caption_length: int) -> list[Record]:
        return read_builder(builder, split, counter, image_column=image_column, caption_column=caption_column,
                            min_caption_length=min_caption_length)

    return base.load(f"{source}[{split}]", read, counter, options)
