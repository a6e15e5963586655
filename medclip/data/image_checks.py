"""Checks that keep bad images out of the tf.data graph, each drop counted under its reason.

Two levels:
- `check_images` (every source runs it): reads each image's header with PIL, which is lazy, so nothing is decoded.
  Catches missing and zero-byte files, bytes that are no image, formats TF cannot decode, decompression bombs
  (declared size over `max_pixels`, checked before any decode) and truncated JPEG/PNG files (no end-of-image
  marker). Cheap: one `open` and two small reads per file. CMYK JPEGs (PMC figures include them) are kept and
  converted to RGB by PIL, re-encoded as PNG in memory (counted as `converted_cmyk`): TF's decoder treats every
  CMYK JPEG as Adobe-inverted, so a plain CMYK JPEG would come out with inverted colours, while PIL reads the
  Adobe marker and converts both kinds.
- `verify_decode` (`medclip.data.prepare` runs it; optional elsewhere): decodes every image with the same TF
  decoder the pipeline uses (JPEGs at 1/8 scale, which still reads all the compressed data), so corruption in the
  middle of a file is found too; it also measures mean intensity for the optional dark-image filter.

Whatever slips through both is still counted, not lost: the pipeline skips an image it cannot decode and reports
it (see `medclip.data.pipeline`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import os
import warnings

from PIL import Image, UnidentifiedImageError

from medclip.data import records
from medclip.data.records import DropCounter, Record
from medclip.storage import is_url, read_bytes

DEFAULT_MAX_PIXELS = 8192 * 8192  # ROCO's largest images are a few megapixels
SUPPORTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP")  # what TF decodes in the graph
_TAIL_BYTES = 4096
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}


def describe(image: str | bytes) -> str:
    return image if isinstance(image, str) else f"<{len(image)} bytes>"


def _read_head_and_tail(image: str | bytes) -> tuple[io.BytesIO | str, bytes, bytes, int]:
    if isinstance(image, bytes):
        return io.BytesIO(image), image[:8], image[-_TAIL_BYTES:], len(image)
    size = os.path.getsize(image)
    with open(image, "rb") as f:
        head = f.read(8)
        f.seek(max(0, size - _TAIL_BYTES))
        tail = f.read()
    return image, head, tail, size


def _magic_format(head: bytes) -> str | None:
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    return None


def image_problem(image: str | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str, str] | None:
    """(reason, detail) when the image must be dropped, None when it can go to the pipeline (possibly after
    `rgb_image`, for a CMYK JPEG). Never raises."""
    return inspect_image(image, max_pixels)[0]


def inspect_image(image: str | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[tuple[str, str] | None, bool]:
    """(`image_problem`, whether the image is a CMYK JPEG that must be converted to RGB first)."""
    problem, mode = _inspect(image, max_pixels)
    return problem, problem is None and mode == "CMYK"


def rgb_image(image: str | bytes) -> str | bytes:
    """The image as the pipeline should read it: itself, or for a CMYK JPEG its PIL RGB conversion as PNG bytes."""
    if not inspect_image(image)[1]:
        return image
    return cmyk_to_rgb_png(image)


def cmyk_to_rgb_png(image: str | bytes) -> bytes:
    """PIL's CMYK -> RGB (Adobe-inverted or plain, as the file's APP14 marker says), losslessly as PNG."""
    image = read_bytes(image) if is_url(image) else image
    with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
        rgb = opened.convert("RGB")
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _inspect(image: str | bytes, max_pixels: int) -> tuple[tuple[str, str] | None, str | None]:
    if isinstance(image, str) and is_url(image):  # an object in a bucket: fetched once, then checked as bytes
        try:
            image = read_bytes(image)
        except OSError as error:
            return (records.MISSING_FILE, str(error)), None
    if isinstance(image, str) and not os.path.isfile(image):
        return (records.MISSING_FILE, "no such file"), None
    try:
        source, head, tail, size = _read_head_and_tail(image)
    except OSError as error:
        return (records.MISSING_FILE, str(error)), None
    if size == 0:
        return (records.EMPTY_FILE, "0 bytes"), None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as opened:
                image_format, mode, (width, height) = opened.format, opened.mode, opened.size
    except Image.DecompressionBombError as error:
        return (records.DECOMPRESSION_BOMB, str(error)), None
    except UnidentifiedImageError:
        return (records.NOT_AN_IMAGE, "not a recognised image format"), None
    except Exception as error:  # PIL raises many types on a broken header
        image_format = _magic_format(head)
        if image_format and _END_MARKERS[image_format] not in tail:
            detail = f"{image_format} without its end marker ({type(error).__name__}: {error})"
            return (records.TRUNCATED_IMAGE, detail), None
        return (records.CORRUPT_IMAGE, f"{type(error).__name__}: {error}"), None
    if image_format not in SUPPORTED_FORMATS:
        return (records.UNSUPPORTED_IMAGE,
                f"format {image_format}; supported: {', '.join(SUPPORTED_FORMATS)}"), None
    if width <= 0 or height <= 0:
        return (records.CORRUPT_IMAGE, f"declared size {width}x{height}"), None
    if width * height > max_pixels:
        return (records.DECOMPRESSION_BOMB,
                f"declared size {width}x{height} is over max_pixels={max_pixels}"), None
    if image_format == "BMP" and mode == "1":
        return (records.UNSUPPORTED_IMAGE, "1-bit BMP"), None
    marker = _END_MARKERS.get(image_format)
    if marker is not None and marker not in tail:
        return (records.TRUNCATED_IMAGE, f"{image_format} without its end marker"), None
    return None, ("CMYK" if image_format == "JPEG" and mode == "CMYK" else mode)


def check_images(
    items: list[Record], counter: DropCounter, max_pixels: int = DEFAULT_MAX_PIXELS, threads: int = 8
) -> list[Record]:
    """Keeps the records whose image passes `image_problem`; the rest are counted (or raise under strict).
    A CMYK JPEG is kept with its image replaced by the RGB PNG bytes of `cmyk_to_rgb_png` (`converted_cmyk`)."""
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        inspected = list(pool.map(lambda record: inspect_image(record.image, max_pixels), items))
    kept = []
    for record, (problem, is_cmyk) in zip(items, inspected, strict=True):
        if problem is None and is_cmyk:
            kept.append(dataclasses.replace(record, image=cmyk_to_rgb_png(record.image)))
            counter.change(records.CONVERTED_CMYK, 1, f"{record.source or record.id}: {describe(record.image)}")
        elif problem is None:
            kept.append(record)
        else:
            reason, detail = problem
            counter.drop(reason, record.source or record.id, f"image {describe(record.image)}: {detail}")
    return kept


def verify_decode(
    items: list[Record], counter: DropCounter, min_mean_intensity: float | None = None
) -> list[Record]:
    """Decodes every image with TF; drops the undecodable (`corrupt_image`) and, when `min_mean_intensity` is set,
    the near-black (`dark_image`: mean over pixels and channels on the 0-255 scale below the threshold)."""
    import tensorflow as tf

    from medclip.data import images

    def mean_intensity(contents):
        decoded = tf.cond(
            images.is_jpeg(contents),
            lambda: tf.cast(tf.io.decode_jpeg(contents, channels=3, ratio=8), tf.float32),
            lambda: images.decode_rgb(contents),
        )
        return tf.reduce_mean(decoded)

    dataset = image_contents(items).enumerate()
    dataset = dataset.map(lambda index, contents: (index, mean_intensity(contents)),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    means = dict(dataset.ignore_errors().as_numpy_iterator())
    kept = []
    for index, record in enumerate(items):
        where = record.source or record.id
        if index not in means:
            counter.drop(records.CORRUPT_IMAGE, where, f"image {describe(record.image)}: {_decode_error(record)}")
        elif min_mean_intensity is not None and means[index] < min_mean_intensity:
            counter.drop(records.DARK_IMAGE, where,
                         f"image {describe(record.image)}: mean intensity {means[index]:.1f} < {min_mean_intensity}")
        else:
            kept.append(record)
    return kept


def image_contents(items: list[Record]):
    """A tf.data.Dataset of the encoded bytes of each record's image, in order (files are read lazily)."""
    import tensorflow as tf

    if all(isinstance(record.image, str) and not is_url(record.image) for record in items):
        paths = tf.data.Dataset.from_tensor_slices(tf.constant([record.image for record in items], tf.string))
        return paths.map(tf.io.read_file, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return tf.data.Dataset.from_generator(
        lambda: (_read(record.image) for record in items), output_signature=tf.TensorSpec([], tf.string)
    )


def _read(image: str | bytes) -> bytes:
    """The encoded bytes; b"" for a file that cannot be read (it then fails to decode and is counted)."""
    if isinstance(image, bytes):
        return image
    try:
        return read_bytes(image)
    except OSError:
        return b""


def _decode_error(record: Record) -> str:
    """The decoder's own message for one image that failed (only called for failures)."""
    import tensorflow as tf

    from medclip.data import images

    try:
        images.decode_rgb(tf.constant(_read(record.image)))
    except Exception as error:  # the message is all we want here
        return f"TF cannot decode it: {str(error).splitlines()[0][:200]}"
    return "TF cannot decode it at reduced scale"
