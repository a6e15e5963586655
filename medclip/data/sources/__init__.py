"""Data sources. Each `load_*` returns a list of `medclip.data.records.Record` and counts what it dropped.

- `roco.load_roco`: ROCO's raw layout (`data/{split}/{radiology,non-radiology}/captions.txt`, `images/`).
- `csv_source.load_csv`, `csv_source.load_rocov2`: CSV files with configurable columns; ROCOv2.
- `jsonl.load_jsonl`: JSON lines `{"image_path": ..., "captions": [...]}` (the original medclip format).
- `hf_datasets.load_hf_dataset`: Hugging Face `datasets` (saved folder, parquet, or a hub id when online).
- `tfds_roco`: a TFDS builder for ROCO reading a manual download directory.
- `tfds_source.load_tfds`: any prepared TFDS dataset (`tfds:NAME[/CONFIG]`), e.g. the one `tfds_roco` builds.
- `concept_names`: CUI -> name (ROCOv2's cui_mapping.csv, or a `CUI,name` CSV for any dataset).
"""
