"""Image ops for tf.data: decode, crop, resize, flip, normalise.

Every op works eagerly and inside a `tf.data` map. Decoding handles JPEG, PNG, GIF (first frame) and BMP; grayscale,
palette and RGBA images become RGB (alpha is dropped), 16-bit PNGs are scaled onto the
8-bit range [0, 255] (all decoded images are float32 on that scale until `normalize`).

JPEGs take a fast path: only the crop window is decoded (`decode_and_crop_jpeg`), and when the window is at least
2x, 4x or 8x the output size it is decoded at that reduced scale by libjpeg's DCT scaling, so a 1500 px image
cropped to 224 px never materialises at full size.

`eval_image` can instead resize exactly as open_clip and CLIPImageProcessor do (`Preprocess.resample` "pil_bicubic":
PIL's antialiased resize of the fully decoded image, then the centre crop), through `tf.numpy_function`.

These ops assume images that passed `medclip.data.image_checks` (the sources run those checks): a corrupt image
here raises an error instead of being skipped silently.
"""

from __future__ import annotations

import io
import math

import numpy as np
import tensorflow as tf
from PIL import Image

from medclip.models.preprocess import CLIP_MEAN, CLIP_STD, Preprocess

DEFAULT_CROP_SCALE = (0.5, 1.0)
DEFAULT_CROP_RATIO = (3 / 4, 4 / 3)
_JPEG_SCALES = (8, 4, 2, 1)  # reduced-scale decode factors libjpeg supports, largest first


def is_jpeg(contents: tf.Tensor) -> tf.Tensor:
    return tf.equal(tf.strings.substr(contents, 0, 3), b"\xff\xd8\xff")


def is_png(contents: tf.Tensor) -> tf.Tensor:
    return tf.equal(tf.strings.substr(contents, 0, 8), b"\x89PNG\r\n\x1a\n")


def decode_rgb(contents: tf.Tensor) -> tf.Tensor:
    """Decodes any supported format to float32 RGB on the 8-bit scale [0, 255], shape (H, W, 3).

    16-bit PNGs are scaled from [0, 65535] onto the same range.
    """

    def png():
        return tf.cast(tf.io.decode_png(contents, channels=3, dtype=tf.uint16), tf.float32) * (255 / 65535)

    def other():  # JPEG, GIF (first frame), BMP
        return tf.cast(tf.io.decode_image(contents, channels=3, expand_animations=False), tf.float32)

    image = tf.cond(is_png(contents), png, other)
    image.set_shape([None, None, 3])
    return image


def random_crop_window(shape: tf.Tensor, seed: tf.Tensor, scale=DEFAULT_CROP_SCALE, ratio=DEFAULT_CROP_RATIO):
    """torchvision's RandomResizedCrop.get_params, stateless: (top, left, height, width) as int32 scalars.

    Ten tries of (area fraction ~ U(scale), log aspect ratio ~ U(log ratio)); the first that fits wins, otherwise
    the largest centred crop within the ratio range. `seed` is a shape (2,) int tensor.
    """
    height = tf.cast(shape[0], tf.float32)
    width = tf.cast(shape[1], tf.float32)
    tries = 10
    draws = tf.random.stateless_uniform([4, tries], seed=seed)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * draws[0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = tf.exp(log_lo + (log_hi - log_lo) * draws[1])
    crop_w = tf.round(tf.sqrt(area * aspect))
    crop_h = tf.round(tf.sqrt(area / aspect))
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)

    def sampled():
        h, w = crop_h[first], crop_w[first]
        top = tf.floor(draws[2, first] * (height - h + 1))
        left = tf.floor(draws[3, first] * (width - w + 1))
        return tf.stack([top, left, h, w])

    def centred():
        in_ratio = width / height
        w = tf.where(in_ratio < ratio[0], width, tf.where(in_ratio > ratio[1], tf.round(height * ratio[1]), width))
        h = tf.where(in_ratio < ratio[0], tf.round(width / ratio[0]), height)
        return tf.stack([tf.floor((height - h) / 2), tf.floor((width - w) / 2), h, w])

    window = tf.cast(tf.cond(tf.reduce_any(fits), sampled, centred), tf.int32)
    return window[0], window[1], window[2], window[3]


def center_crop_window(shape: tf.Tensor):
    """The largest centred square: resizing it to the output size equals "resize shorter side + center crop"."""
    side = tf.minimum(shape[0], shape[1])
    return (shape[0] - side) // 2, (shape[1] - side) // 2, side, side


def decode_crop(contents: tf.Tensor, window_fn, size: int) -> tf.Tensor:
    """Decodes only the window `window_fn((height, width))` = (top, left, height, width) of the image, resized to
    (size, size, 3) float32 on the [0, 255] scale.

    JPEGs: the shape comes from the header, and the window is decoded at the largest reduced scale (1/8, 1/4, 1/2)
    that keeps it at least `size` pixels on both sides. Other formats are decoded once, whole, and cropped.
    """

    def jpeg():
        top, left, height, width = window_fn(tf.io.extract_jpeg_shape(contents)[:2])
        branches = []
        for factor in _JPEG_SCALES:

            def branch(factor=factor):
                crop = tf.stack([top // factor, left // factor, tf.maximum(height // factor, 1),
                                 tf.maximum(width // factor, 1)])
                return tf.io.decode_and_crop_jpeg(contents, crop, channels=3, ratio=factor)

            branches.append(branch)
        shortest = tf.minimum(height, width)
        index = tf.argmax(tf.stack([shortest >= factor * size for factor in _JPEG_SCALES]), output_type=tf.int32)
        return tf.cast(tf.switch_case(index, branches), tf.float32)

    def other():
        image = decode_rgb(contents)
        top, left, height, width = window_fn(tf.shape(image)[:2])
        return image[top : top + height, left : left + width]

    crop = tf.cond(is_jpeg(contents), jpeg, other)
    crop.set_shape([None, None, 3])
    return resize(crop, size)


def resize(image: tf.Tensor, size: int) -> tf.Tensor:
    """Bilinear resize to (size, size), antialiased when both sides shrink by 2x or more.

    After a reduced-scale JPEG decode the rest of the shrink is under 2x, where plain bilinear is close to an
    antialiased one (and ~4x cheaper in TF: `antialias=True` runs ScaleAndTranslate).
    """
    shrink = tf.minimum(tf.shape(image)[0], tf.shape(image)[1]) // size
    image = tf.cond(
        shrink >= 2,
        lambda: tf.image.resize(image, [size, size], method="bilinear", antialias=True),
        lambda: tf.image.resize(image, [size, size], method="bilinear"),
    )
    return tf.ensure_shape(image, [size, size, 3])


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Horizontal flip with probability 1/2. Off by default in training: radiology captions say left and right."""
    return tf.image.stateless_random_flip_left_right(image, seed=seed)


def normalize(image: tf.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> tf.Tensor:
    """(image / 255 - mean) / std per channel, for an (H, W, 3) or (B, H, W, 3) image on the [0, 255] scale.

    The per-channel constants are tiled to the image's (H, W, 3): a same-shape multiply-add is several times
    faster in TF than broadcasting a (3,) vector over the channel axis.
    """
    scale = 1 / (255 * np.asarray(std, np.float32))
    offset = -np.asarray(mean, np.float32) / np.asarray(std, np.float32)
    height, width = image.shape[-3], image.shape[-2]
    if height is not None and width is not None:
        scale, offset = (np.broadcast_to(value, (height, width, 3)) for value in (scale, offset))
    return tf.cast(image, tf.float32) * tf.constant(scale, tf.float32) + tf.constant(offset, tf.float32)


def full_window(shape: tf.Tensor):
    """The whole image: resizing it to a square squashes it (open_clip's resize_mode "squash")."""
    return 0, 0, shape[0], shape[1]


def train_image(contents: tf.Tensor, seed: tf.Tensor, size: int, crop_scale=DEFAULT_CROP_SCALE,
                hflip: bool = False, preprocess: Preprocess | None = None) -> tf.Tensor:
    """Encoded bytes -> random resized crop, optional flip, the model's normalisation: float32 (size, size, 3)."""
    preprocess = preprocess or Preprocess()
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = decode_crop(contents, lambda shape: random_crop_window(shape, crop_seed, crop_scale), size)
    if hflip:
        image = random_flip(image, flip_seed)
    return normalize(image, preprocess.mean, preprocess.std)


def eval_image(contents: tf.Tensor, size: int, preprocess: Preprocess | None = None) -> tf.Tensor:
    """Encoded bytes -> resize (shorter side + centre crop, or squash) and the model's normalisation (CLIP's by
    default): float32 (size, size, 3). `preprocess.resample` picks TF's fast path or PIL's exact one."""
    preprocess = preprocess or Preprocess()
    if preprocess.resample.startswith("pil_"):
        image = tf.numpy_function(lambda data: pil_resize_crop(data, size, preprocess.resize_mode, preprocess.resample,
                                                               preprocess.crop_rounding),
                                  [contents], tf.float32, stateful=False)
        image = tf.ensure_shape(image, [size, size, 3])
    else:
        window = full_window if preprocess.resize_mode == "squash" else center_crop_window
        image = decode_crop(contents, window, size)
    return normalize(image, preprocess.mean, preprocess.std)


_PIL_FILTERS = {"pil_bicubic": Image.Resampling.BICUBIC, "pil_bilinear": Image.Resampling.BILINEAR}
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I", "F")


def pil_resize_crop(contents: bytes, size: int, resize_mode: str = "shortest", resample: str = "pil_bicubic",
                    crop_rounding: str = "round") -> np.ndarray:
    """torchvision's `Resize(size)` (or `Resize((size, size))` to squash) + `CenterCrop(size)` + RGB conversion on
    a PIL image, in that order, as open_clip's and OpenAI CLIP's transforms run them: float32 (size, size, 3) on
    the [0, 255] scale. PIL resizes with antialiasing (its filter widens with the shrink factor), which TF's
    bilinear path only approximates. `crop_rounding` "floor" starts an odd-margin crop as transformers'
    CLIPImageProcessor does, and converts to RGB first as it does (a CMYK JPEG then resizes in RGB). 16-bit images
    are first scaled onto 8 bits as `decode_rgb` does (the reference would clip them to white)."""
    if isinstance(contents, np.ndarray):  # a tf.string scalar through tf.numpy_function: 0-d object array
        contents = contents.item()
    with Image.open(io.BytesIO(contents)) as opened:
        image = opened.copy() if opened.mode not in _SIXTEEN_BIT else Image.fromarray(
            np.round(np.asarray(opened, np.float64) * (255 / 65535)).clip(0, 255).astype(np.uint8))
    if crop_rounding == "floor":  # CLIPImageProcessor converts to RGB before resizing (open_clip after cropping)
        image = image.convert("RGB")
    width, height = image.size
    if resize_mode == "squash":
        target = (size, size)
    elif width <= height:  # torchvision's _compute_resized_output_size: the long side is truncated
        target = (size, int(size * height / width))
    else:
        target = (int(size * width / height), size)
    if target != (width, height):
        image = image.resize(target, _PIL_FILTERS[resample])
    width, height = image.size
    if crop_rounding == "floor":
        top, left = (height - size) // 2, (width - size) // 2
    else:  # torchvision's center_crop
        top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    image = image.crop((left, top, left + size, top + size)).convert("RGB")
    return np.asarray(image, np.float32)
