"""Embeds images and texts with a saved FlaxHybridCLIP, in fixed-size jitted batches.

Fixed batch shapes (padded, then cut) mean one compilation per model, however many images come in.
Images go through the same resize + center-crop + normalisation as evaluation, in tf.data, as the model's
`preprocess` says (TF's fast resize, or PIL's exact one); texts through its tokenizer at its own context length.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from medclip import storage
from medclip.checkpoints.hub import resolve_model_dir, resolve_model_name
from medclip.checkpoints.tokenizers import for_model_text, tokenizer_for_model
from medclip.data.image_checks import inspect_image, rgb_image
from medclip.hybrid_clip import FlaxHybridCLIP
from medclip.inference.scores import match_probabilities
from medclip.models.hybrid import l2_normalize
from medclip.models.registry import max_text_positions


class ImageError(ValueError):
    """An input image that cannot be used; names the file and why."""


def model_fingerprint(folder: Path) -> str:
    """Identifies the weights an index was built with (sha256 of config and weights files)."""
    digest = hashlib.sha256()
    if folder.is_file():  # a bare checkpoint file
        with folder.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()[:16]
    for name in ("config.json", "model.safetensors", "open_clip_config.json", "open_clip_model.safetensors",
                 "open_clip_pytorch_model.bin"):
        path = folder / name
        if path.exists():
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


class Embedder:
    """Texts are tokenised as the model's config says (`text_preprocess`: its context length, padding and whether
    the padding is attended to) and images preprocessed as its `preprocess` says; `max_seq_length` and `resample`
    override them."""

    def __init__(self, model_dir: str | os.PathLike, *, batch_size: int = 32, max_seq_length: int | None = None,
                 resample: str | None = None):
        model_dir = resolve_model_name(model_dir)  # PMC_CLIP:beta -> its cached checkpoint.pt
        storage.check_readable(model_dir, "model")
        url = str(model_dir) if storage.is_url(model_dir) else None
        model_dir = storage.local_mirror(model_dir)  # a bucket folder is served from a local copy
        path = Path(str(model_dir).removeprefix("hf-hub:")).expanduser()
        if path.is_file():  # a bare checkpoint (PMC-CLIP's checkpoint.pt): its tokenizer sits beside it
            self.model = FlaxHybridCLIP.from_pretrained(path)
            self.model_dir = path.parent
        else:
            self.model_dir = resolve_model_dir(model_dir)
            self.model = FlaxHybridCLIP.from_pretrained(self.model_dir)
        self.location = url or str(self.model_dir)  # what an index records: the bucket URL, not the local copy
        self.tokenizer = for_model_text(tokenizer_for_model(self.model_dir, self.model.config),
                                        self.model.config.text_preprocess)
        self.fingerprint = model_fingerprint(path if path.is_file() else self.model_dir)
        self.batch_size = batch_size
        config = self.model.config
        self.max_seq_length = (config.context_length if max_seq_length is None
                               else min(max_seq_length, max_text_positions(config.text_config)))
        # Attended padding (PMC-CLIP) changes the features with the padded length: always the context length.
        self.pad_to_max_length = config.text_preprocess.padding == "max_length"
        self.image_size = config.vision_config.image_size
        self.image_preprocess = (config.image_preprocess if resample is None
                                 else config.image_preprocess.replace(resample=resample))
        graphdef, params = nnx.split(self.model)
        self._image_fn = jax.jit(lambda p, x: l2_normalize(nnx.merge(graphdef, p).encode_image(x)))
        self._text_fn = jax.jit(lambda p, ids, mask, second_ids, second_mask: l2_normalize(
            nnx.merge(graphdef, p).encode_text(ids, mask, second_input_ids=second_ids,
                                               second_attention_mask=second_mask)))
        self._params = params

    @property
    def dim(self) -> int:
        return self.model.config.projection_dim

    def logit_scale(self) -> float:
        return float(self.model.temperature_scale())

    def logit_bias(self) -> float | None:
        """The learned bias of a sigmoid-loss model (SigLIP), None for a contrastive one."""
        return None if self.model.logit_bias is None else float(self.model.logit_bias[...])

    def match_probabilities(self, cosines: np.ndarray) -> np.ndarray:
        """Candidates' probabilities as the model computes them: sigmoid per pair for a sigmoid-loss model,
        softmax over the candidates otherwise (medclip.inference.scores)."""
        return match_probabilities(cosines, self.logit_scale(), self.logit_bias())

    # -- texts ---------------------------------------------------------------------------------------------
    @property
    def text_inputs(self) -> int:
        """2 for a model trained with a second text (keywords, concepts): see `embed_texts`."""
        return self.model.config.text_inputs

    def embed_texts(self, texts: Sequence[str], second_texts: Sequence[str] | None = None) -> np.ndarray:
        """(len(texts), dim) L2-normalised; empty strings are refused (they embed to noise).

        A two-input model also takes `second_texts` (one per text, "" allowed); without them each text fills
        both inputs, so queries and captions alone still work (zero-shot, retrieval, the app)."""
        texts = list(texts)
        empty = [i for i, t in enumerate(texts) if not t or not t.strip()]
        if empty:
            raise ValueError(f"empty text at position(s) {empty}: give a non-empty query or caption")
        if second_texts is not None:
            if self.text_inputs != 2:
                raise ValueError("this model takes one text input: second_texts cannot be used")
            if len(second_texts) != len(texts):
                raise ValueError(f"{len(second_texts)} second texts for {len(texts)} texts")
        ids, mask = self._tokenize(texts)
        if self.text_inputs == 1:
            return self._batched(lambda a, b: self._text_fn(self._params, a, b, None, None), ids, mask)
        second_ids, second_mask = (ids, mask) if second_texts is None else self._tokenize(list(second_texts))
        return self._batched(lambda a, b, c, d: self._text_fn(self._params, a, b, c, d), ids, mask, second_ids,
                             second_mask)

    def _tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        padding = "max_length" if self.pad_to_max_length else "longest"
        encoded = self.tokenizer(texts, padding=padding, truncation=True, max_length=self.max_seq_length,
                                 return_tensors="np")
        ids, mask = encoded["input_ids"].astype(np.int32), encoded["attention_mask"].astype(np.int32)
        if self.pad_to_max_length:
            return ids, mask
        # Masked padding: pad to a multiple of 16 tokens, not to max_seq_length: short queries run several times
        # faster, at the cost of one compilation per length bucket.
        width = min(-(-ids.shape[1] // 16) * 16, self.max_seq_length)
        pad = width - ids.shape[1]
        if pad > 0:
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=self.tokenizer.pad_token_id or 0)
            mask = np.pad(mask, ((0, 0), (0, pad)))
        return ids, mask

    # -- images --------------------------------------------------------------------------------------------
    def preprocess(self, images: Sequence[str | bytes]) -> np.ndarray:
        """Checks then decodes; (n, size, size, 3) float32. Raises ImageError naming the first bad image."""
        import tensorflow as tf

        from medclip.data.images import eval_image

        for image in images:
            problem = inspect_image(image)[0]
            if problem is not None:
                name = image if isinstance(image, str) else f"<{len(image)} uploaded bytes>"
                raise ImageError(f"{name}: cannot use this image ({problem[0]}: {problem[1]})")
        if not self._pil_path:  # TF reads a plain CMYK JPEG as Adobe-inverted: converted to RGB by PIL first
            images = [rgb_image(image) for image in images]
        contents = [tf.io.read_file(i) if isinstance(i, str) and not storage.is_url(i) else tf.constant(_contents(i))
                    for i in images]
        try:
            return np.stack([eval_image(c, self.image_size, self.image_preprocess).numpy() for c in contents])
        except tf.errors.InvalidArgumentError as error:
            raise ImageError(f"an image failed to decode: {error.message}") from None

    @property
    def _pil_path(self) -> bool:
        """PIL decodes and resizes (the exact path): it reads CMYK JPEGs correctly itself."""
        return self.image_preprocess.resample.startswith("pil_")

    def embed_images(self, images: Sequence[str | bytes]) -> np.ndarray:
        return self.embed_pixels(self.preprocess(images))

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        return self._batched(lambda x: self._image_fn(self._params, x), pixels)

    def embed_image_files(self, paths: Sequence[str | bytes], *,
                          progress: bool = True) -> tuple[np.ndarray, list[str | bytes], dict]:
        """Embeds many images (files, or encoded bytes) through tf.data; unusable ones are skipped and returned by
        reason, not lost. Files are read by TF; bytes and CMYK JPEGs (converted to RGB by PIL) come from memory."""
        import tensorflow as tf

        from medclip.data.images import eval_image

        kept, skipped, in_memory = [], {}, {}
        for path in paths:
            problem, is_cmyk = inspect_image(path)
            if problem is None:
                kept.append(path)
                if isinstance(path, bytes) or (is_cmyk and not self._pil_path):  # TF: CMYK read Adobe-inverted
                    in_memory[len(kept) - 1] = path if self._pil_path else rgb_image(path)
                elif storage.is_url(path):  # an object in a bucket: fetched when read, by medclip.storage
                    in_memory[len(kept) - 1] = path
            else:
                skipped.setdefault(problem[0], []).append(path)
        n = max(len(kept), 1)
        files = [p if isinstance(p, str) else "" for p in kept] or [""]
        held = tf.constant([i in in_memory for i in range(n)])

        def read(index, path):
            def from_memory():
                contents = tf.numpy_function(lambda i: _contents(in_memory[int(i)]), [index], tf.string,
                                             stateful=False)
                contents.set_shape([])
                return contents

            return tf.cond(tf.gather(held, index), from_memory, lambda: tf.io.read_file(path))

        dataset = tf.data.Dataset.from_tensor_slices((tf.range(n, dtype=tf.int64), files)).take(len(kept))
        dataset = dataset.map(lambda i, p: eval_image(read(i, p) if in_memory else tf.io.read_file(p), self.image_size,
                                                    self.image_preprocess),
                              num_parallel_calls=tf.data.AUTOTUNE).batch(self.batch_size).prefetch(2)
        chunks = []
        bar = tqdm(total=len(kept), desc="embed images", unit="img", disable=not progress)
        for batch in dataset.as_numpy_iterator():
            chunks.append(self.embed_pixels(batch))
            bar.update(len(batch))
        bar.close()
        embeds = np.concatenate(chunks) if chunks else np.zeros((0, self.dim), np.float32)
        return embeds, kept, skipped

    def _batched(self, fn, *arrays: np.ndarray) -> np.ndarray:
        n, size = len(arrays[0]), self.batch_size
        out = []
        for start in range(0, n, size):
            chunk = [a[start:start + size] for a in arrays]
            real = len(chunk[0])
            if real < size:  # pad to the compiled shape
                chunk = [np.concatenate([c, np.repeat(c[-1:], size - real, axis=0)]) for c in chunk]
            out.append(np.asarray(fn(*[jnp.asarray(c) for c in chunk]))[:real])
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


def _contents(image: str | bytes) -> bytes:
    """Encoded bytes held in memory, or an object in a bucket fetched now."""
    return storage.read_bytes(image) if isinstance(image, str) else image
