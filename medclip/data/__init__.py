"""Everything between files on disk and device-ready batches.

- `records`: the `Record` every source yields, and the `DropCounter` that accounts for every dropped record.
- `sources`: ROCO raw layout, CSV/ROCOv2, JSON lines, Hugging Face datasets, a TFDS builder.
- `captions`, `image_checks`: cleaning and filtering; `images`: in-graph decode and augmentation ops.
- `pipeline`: the tf.data train/eval pipelines with an exact, saveable position.
- `synthetic`: radiology-like image-caption pairs for demos and tests; `prepare`: ROCO raw files -> JSON lines,
  or any source -> sharded records (`shards`: TFRecord shards read whole or streamed per host; `shard_manifest`:
  their manifest, read without TensorFlow; `record_frames`: the TFRecord framing and its CRCs read in Python;
  `shard_verify`: `medclip verify-shards`).
"""
