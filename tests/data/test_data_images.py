"""Image ops, each checked eagerly and inside tf.data."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from medclip.data import images

GRADIENT = np.add.outer(np.arange(48), np.arange(64)).astype(np.uint8) * 2  # (48, 64), smooth: survives JPEG


def encode(array: np.ndarray, fmt: str, mode: str | None = None, **kwargs) -> bytes:
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def in_tf_data(fn, *inputs):
    """fn applied inside a tf.data map (graph mode), returned as numpy."""
    dataset = tf.data.Dataset.from_tensors(tuple(inputs)).map(fn)
    return next(iter(dataset.as_numpy_iterator()))


@pytest.mark.parametrize("fmt, mode", [("JPEG", "L"), ("JPEG", "RGB"), ("PNG", "L"), ("PNG", "RGBA"), ("PNG", "P"),
                                       ("PNG", "LA"), ("GIF", "L"), ("BMP", "RGB"), ("BMP", "L")])
def test_decode_rgb_any_format_becomes_rgb(fmt, mode):
    contents = encode(GRADIENT, fmt, mode)
    eager = images.decode_rgb(tf.constant(contents)).numpy()
    graph = in_tf_data(images.decode_rgb, contents)
    assert eager.shape == (48, 64, 3) and eager.dtype == np.float32
    np.testing.assert_array_equal(eager, graph)
    tolerance = 8 if fmt == "JPEG" else (40 if mode == "P" else 0.5)
    assert np.abs(eager[..., 0] - GRADIENT).max() <= tolerance
    np.testing.assert_allclose(eager[..., 0], eager[..., 2], atol=1)  # grey stays grey in every channel


def test_16_bit_png_is_scaled_to_the_8_bit_range():
    sixteen = (GRADIENT.astype(np.uint16) * 257)  # full 16-bit range
    contents = encode(sixteen, "PNG")
    assert Image.open(io.BytesIO(contents)).mode.startswith("I;16")
    decoded = images.decode_rgb(tf.constant(contents)).numpy()
    np.testing.assert_allclose(decoded[..., 1], GRADIENT, atol=0.01)


def test_random_crop_window_matches_torchvision_rules():
    shape = tf.constant([300, 500])
    windows = set()
    for seed in range(200):
        window = images.random_crop_window(shape, tf.constant([seed, 1]), (0.5, 1.0))
        top, left, height, width = (int(v) for v in window)
        assert 0 <= top and top + height <= 300 and 0 <= left and left + width <= 500
        assert 0.5 * 150000 * 0.97 <= height * width <= 150000
        assert 3 / 4 - 0.02 <= width / height <= 4 / 3 + 0.02
        windows.add((top, left, height, width))
    assert len(windows) > 150
    same = [int(v) for v in images.random_crop_window(shape, tf.constant([7, 1]), (0.5, 1.0))]
    assert same == [int(v) for v in images.random_crop_window(shape, tf.constant([7, 1]), (0.5, 1.0))]


def test_random_crop_window_falls_back_to_a_centred_crop():
    # A 10:1 strip cannot hold any 3/4..4/3 crop of >= 90% of its area: torchvision's fallback centres one.
    top, left, height, width = (int(v) for v in images.random_crop_window(tf.constant([20, 200]), tf.constant([1, 2]),
                                                                           (0.9, 1.0)))
    assert (height, width) == (20, round(20 * 4 / 3)) and top == 0 and left == (200 - width) // 2


def test_decode_crop_reduced_scale_jpeg_matches_full_decode():
    y, x = np.mgrid[0:1000, 0:1000]
    smooth = np.stack([(x * 0.25) % 256, (y * 0.2) % 256, ((x + y) * 0.1) % 256], -1).astype(np.uint8)
    contents = tf.constant(encode(smooth, "JPEG", quality=95))  # 1000 x 1000
    def window(shape):
        return tf.constant(100), tf.constant(200), tf.constant(800), tf.constant(640)

    fast = images.decode_crop(contents, window, 96).numpy()  # 640/96 >= 4: decoded at 1/4 scale
    reference = tf.image.resize(tf.cast(tf.io.decode_jpeg(contents)[100:900, 200:840], tf.float32), [96, 96],
                                antialias=True).numpy()
    assert fast.shape == (96, 96, 3)
    assert np.abs(fast - reference).mean() < 2  # on the 0-255 scale


def test_decode_crop_same_for_png_and_jpeg_paths():
    array = np.repeat(GRADIENT[..., None], 3, axis=2)
    def window(shape):
        return tf.constant(8), tf.constant(4), tf.constant(32), tf.constant(40)

    png = images.decode_crop(tf.constant(encode(array, "PNG")), window, 16).numpy()
    jpeg = images.decode_crop(tf.constant(encode(array, "JPEG", quality=98)), window, 16).numpy()
    assert np.abs(png - jpeg).max() < 6


def test_normalize_uses_clip_statistics():
    image = tf.fill([4, 4, 3], 255.0)
    normalised = images.normalize(image).numpy()
    expected = (1 - np.array(images.CLIP_MEAN)) / np.array(images.CLIP_STD)
    np.testing.assert_allclose(normalised[2, 3], expected, rtol=1e-5)
    batch = images.normalize(tf.zeros([2, 4, 4, 3])).numpy()
    np.testing.assert_allclose(batch[1, 0, 0], -np.array(images.CLIP_MEAN) / np.array(images.CLIP_STD), rtol=1e-5)


def test_train_image_eager_equals_tf_data_and_depends_on_seed():
    contents = encode(np.repeat(GRADIENT[..., None], 3, axis=2), "JPEG")
    def fn(contents, seed):
        return images.train_image(contents, seed, 32, (0.3, 1.0))

    eager = fn(tf.constant(contents), tf.constant([1, 2], tf.int64)).numpy()
    graph = in_tf_data(fn, contents, np.array([1, 2], np.int64))
    other = fn(tf.constant(contents), tf.constant([3, 2], tf.int64)).numpy()
    assert eager.shape == (32, 32, 3) and eager.dtype == np.float32
    np.testing.assert_allclose(eager, graph, atol=1e-5)
    assert not np.allclose(eager, other)


def test_hflip_is_off_by_default_and_flips_when_on():
    array = np.zeros((40, 40, 3), np.uint8)
    array[:, :20] = 255  # left half white
    contents = tf.constant(encode(array, "PNG"))
    flips = 0
    for seed in range(8):
        plain = images.train_image(contents, tf.constant([seed, 0], tf.int64), 16, (1.0, 1.0))
        flipped = images.train_image(contents, tf.constant([seed, 0], tf.int64), 16, (1.0, 1.0), hflip=True)
        assert plain.numpy()[:, :4].mean() > plain.numpy()[:, -4:].mean()  # never flipped without hflip
        flips += int(flipped.numpy()[:, :4].mean() < flipped.numpy()[:, -4:].mean())
    assert 0 < flips < 8


def test_eval_image_is_a_center_crop():
    array = np.zeros((40, 80, 3), np.uint8)
    array[:, 20:60] = 255  # the centred square is white, the sides black
    def eval_fn(contents):
        return images.eval_image(contents, 20)

    result = eval_fn(tf.constant(encode(array, "PNG"))).numpy()
    np.testing.assert_allclose(result, in_tf_data(eval_fn, encode(array, "PNG")), atol=1e-6)
    white = (1 - np.array(images.CLIP_MEAN)) / np.array(images.CLIP_STD)
    np.testing.assert_allclose(result[:, 1:-1].mean(axis=(0, 1)), white, atol=0.05)
