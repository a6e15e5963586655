"""A TFDS builder for ROCO that reads a manual download directory (ROCO's raw layout, see `roco.py`).

    builder = Roco(data_dir="~/tensorflow_datasets")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir="path/to/roco-dataset"))
    items = load_tfds_roco(builder, "train")   # Records with the image bytes

Examples are checked and cleaned exactly as `load_roco` does; each split's drop summary is logged and kept in the
dataset's metadata (`builder.info.metadata["drops_train"]`, saved as metadata.json).
"""

from __future__ import annotations

from pathlib import Path

import tensorflow_datasets as tfds
from etils import epath

from medclip.data.records import DropCounter, Record
from medclip.data.sources import base, roco

_DESCRIPTION = "ROCO: radiology (and other) images from PubMed Central with their captions, UMLS concepts, keywords."
_CITATION = """@inproceedings{pelka2018roco,
  title={Radiology Objects in COntext (ROCO): A Multimodal Image Dataset},
  author={Pelka, Obioma and Koitka, Sven and R{\\"u}ckert, Johannes and Nensa, Felix and Friedrich, Christoph M.},
  booktitle={LABELS 2018, MICCAI workshop, LNCS 11043}, pages={180--189}, year={2018}}"""


class RocoConfig(tfds.core.BuilderConfig):
    def __init__(self, *, subsets: tuple[str, ...], **kwargs):
        super().__init__(**kwargs)
        self.subsets = subsets


class Roco(tfds.core.GeneratorBasedBuilder):
    """ROCO from a manual download directory."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Clone https://github.com/razorx89/roco-dataset and run its fetch script; pass the clone (or its data/ "
        "folder) as manual_dir. Expected: data/{train,validation,test}/{radiology,non-radiology}/captions.txt and "
        "images/ROCO_ID.jpg."
    )
    BUILDER_CONFIGS = [
        RocoConfig(name="radiology", description="The radiology subset.", subsets=("radiology",)),
        RocoConfig(name="all", description="Radiology and non-radiology.", subsets=roco.SUBSETS),
    ]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS finds this through importlib.resources of the top package, which fails for a namespace package
        # (e.g. an editable install made before medclip/__init__.py existed); the file is known, say so.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "image": tfds.features.Image(shape=(None, None, 3)),
                "captions": tfds.features.Sequence(tfds.features.Text()),
                "concepts": tfds.features.Sequence(tfds.features.Text()),
                "keywords": tfds.features.Sequence(tfds.features.Text()),
            }),
            supervised_keys=None,
            metadata=tfds.core.MetadataDict(),
            homepage="https://github.com/razorx89/roco-dataset",
            citation=_CITATION,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = Path(dl_manager.manual_dir)
        splits = roco.available_splits(root, self.builder_config.subsets)
        if not splits:
            raise FileNotFoundError(f"no ROCO split under {root}. {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        return {split: self._generate_examples(root, split) for split in splits}

    def _generate_examples(self, root: Path, split: str):
        counter = DropCounter()
        items = roco.load_roco(root, split, self.builder_config.subsets, counter=counter)
        base.log_report(f"tfds ROCO {split}", counter)
        self.info.metadata[f"drops_{split}"] = counter.summary()
        for record in items:
            yield record.id, {
                "id": record.id,
                "image": record.image,
                "captions": record.captions,
                "concepts": record.concepts,
                "keywords": record.keywords,
            }


def load_tfds_roco(builder: tfds.core.DatasetBuilder, split: str = "train") -> list[Record]:
    """Records (image bytes, not decoded) from a prepared ROCO TFDS dataset."""
    dataset = builder.as_dataset(split=split, shuffle_files=False,
                                 decoders={"image": tfds.decode.SkipDecoding()})
    items = []
    for example in dataset.as_numpy_iterator():
        record_id = example["id"].decode()
        items.append(Record(
            id=record_id,
            image=example["image"],
            captions=[c.decode() for c in example["captions"]],
            concepts=[c.decode() for c in example["concepts"]],
            keywords=[k.decode() for k in example["keywords"]],
            source=f"tfds {builder.name}/{builder.builder_config.name}[{split}]:{record_id}",
        ))
    return items
