"""Checks that keep bad images out of the tf.data graph, each drop counted under its reason.

Two levels:
- `check_images` (every source runs it): reads each image's header with PIL, which is lazy, so nothing is decoded.
  Catches missing and zero-byte files, bytes that are no image, formats TF cannot decode, decompression bombs
  (declared size over `max_pixels`, checked before any decode) and truncated JPEG/PNG files (no end-of-image
  marker). Cheap: one `open` and two small reads per file; for an object in a bucket two small ranged requests
  (its head and tail), many objects at once, so that the pipeline's read is the only one of its body. CMYK JPEGs
  (PMC figures include them) are kept and converted to RGB by PIL, re-encoded as PNG in memory (counted as
  `converted_cmyk`): TF's decoder treats every CMYK JPEG as Adobe-inverted, so a plain CMYK JPEG would come out
  with inverted colours, while PIL reads the Adobe marker and converts both kinds.
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
from medclip.storage import is_url, read_bytes, read_many

DEFAULT_MAX_PIXELS = 8192 * 8192  # ROCO's largest images are a few megapixels
SUPPORTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP")  # what TF decodes in the graph
_TAIL_BYTES = 4096
# Of an object in a bucket the checks read this much of the start (enough for PIL's header: a JPEG's markers up to
# its first scan, a PNG's chunks up to its image data) and `_TAIL_BYTES` of the end, for so many objects at once.
_HEAD_BYTES = 16384
_OBJECTS_PER_CALL = 256
_HEADER_ROUNDS = 4  # reads past the head for JPEG headers longer than it, each up to the next segments
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
    if isinstance(image, str) and is_url(image):
        return _inspect_objects([image], max_pixels)[0]
    if isinstance(image, str) and not os.path.isfile(image):
        return (records.MISSING_FILE, "no such file"), None
    try:
        source, head, tail, size = _read_head_and_tail(image)
    except OSError as error:
        return (records.MISSING_FILE, str(error)), None
    return _check(source, head, tail, size, max_pixels)


def _inspect_objects(urls: list[str], max_pixels: int) -> list[tuple[tuple[str, str] | None, str | None]]:
    """`_inspect` for objects in a bucket, from their header and their last `_TAIL_BYTES`, requested concurrently
    `_OBJECTS_PER_CALL` objects at a time: the pipeline reads each body once per epoch, the checks do not read it
    again."""
    found = []
    for begin in range(0, len(urls), _OBJECTS_PER_CALL):
        found += _inspect_chunk(urls[begin:begin + _OBJECTS_PER_CALL], max_pixels)
    return found


def _inspect_chunk(urls: list[str], max_pixels: int) -> list[tuple[tuple[str, str] | None, str | None]]:
    """Two small ranged requests per object: the first `_HEAD_BYTES` (all of a small object) and the tail; a JPEG
    whose header runs past the head (big EXIF or Photoshop segments: a fifth of ROCO's JPEGs) is read on to its
    first scan. Where the header and tail give a problem, the whole object is read and judged instead, so the
    verdict is always the whole file's."""
    heads = read_many(urls, 0, _HEAD_BYTES)
    partial = {j for j, head in enumerate(heads) if isinstance(head, bytes) and len(head) == _HEAD_BYTES}
    tails = dict(zip(sorted(partial), read_many([urls[j] for j in sorted(partial)], -_TAIL_BYTES)))
    for _ in range(_HEADER_ROUNDS):
        more = {j: end for j in sorted(partial) if (end := _jpeg_header_end(heads[j])) is not None}
        if not more:
            break
        rest = read_many([urls[j] for j in more], [len(heads[j]) for j in more], list(more.values()))
        for (j, end), data in zip(more.items(), rest):
            if not isinstance(data, bytes):
                heads[j] = data
                partial.discard(j)
                continue
            if len(heads[j]) + len(data) < end:  # the object ended: the head is all of it
                partial.discard(j)
            heads[j] += data
    found = []
    for j, (url, head) in enumerate(zip(urls, heads)):
        tail = tails.get(j, head) if j in partial else head
        if not isinstance(head, bytes) or not isinstance(tail, bytes):
            error = head if not isinstance(head, bytes) else tail
            found.append(((records.MISSING_FILE, str(error)), None))
            continue
        verdict = _check(io.BytesIO(head), head[:8], tail[-_TAIL_BYTES:], len(head), max_pixels)
        if verdict[0] is not None and j in partial:  # judged on part of the file: judge the whole instead
            try:
                whole = read_bytes(url)
            except OSError as error:
                verdict = (records.MISSING_FILE, str(error)), None
            else:
                verdict = _check(io.BytesIO(whole), whole[:8], whole[-_TAIL_BYTES:], len(whole), max_pixels)
        found.append(verdict)
    return found


def _jpeg_header_end(head: bytes) -> int | None:
    """How far to read a JPEG whose header (its segments up to the first scan) runs past `head`: to the next
    segment's start plus `_HEAD_BYTES` of room; None when `head` holds the first scan's start or is no JPEG."""
    if not head.startswith(b"\xff\xd8"):
        return None
    i = 2
    while i + 4 <= len(head):
        if head[i] != 0xFF:
            return None  # not a segment: PIL will say what is wrong
        marker = head[i + 1]
        if marker == 0xDA:  # start of scan: the header is all here
            return None
        if marker == 0xFF:  # a fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        else:
            i += 2 + int.from_bytes(head[i + 2:i + 4], "big")
    return i + _HEAD_BYTES


def _check(source: io.BytesIO | str, head: bytes, tail: bytes, size: int, max_pixels: int
           ) -> tuple[tuple[str, str] | None, str | None]:
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
    in_bucket = [i for i, record in enumerate(items) if isinstance(record.image, str) and is_url(record.image)]
    verdicts = dict(zip(in_bucket, _inspect_objects([items[i].image for i in in_bucket], max_pixels)))
    rest = [i for i in range(len(items)) if i not in verdicts]
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        verdicts.update(zip(rest, pool.map(lambda i: _inspect(items[i].image, max_pixels), rest)))
    kept = []
    for i, record in enumerate(items):
        problem, mode = verdicts[i]
        if problem is None and mode == "CMYK":
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

    def contents():
        for begin in range(0, len(items), _OBJECTS_PER_CALL):
            yield from encoded_images([record.image for record in items[begin:begin + _OBJECTS_PER_CALL]])

    return tf.data.Dataset.from_generator(contents, output_signature=tf.TensorSpec([], tf.string))


def encoded_images(images: list[str | bytes]) -> list[bytes]:
    """The encoded bytes of each image (bytes, a local file or an object, the objects requested concurrently by
    `storage.read_many`); b"" for one that cannot be read, which then fails to decode and is counted."""
    files = [j for j, image in enumerate(images) if not isinstance(image, bytes)]
    out = list(images)
    for j, data in zip(files, read_many([images[j] for j in files])):
        out[j] = data if isinstance(data, bytes) else b""
    return out


def _read(image: str | bytes) -> bytes:
    """The encoded bytes; b"" for a file that cannot be read (it then fails to decode and is counted)."""
    return encoded_images([image])[0]


def _decode_error(record: Record) -> str:
    """The decoder's own message for one image that failed (only called for failures)."""
    import tensorflow as tf

    from medclip.data import images

    try:
        images.decode_rgb(tf.constant(_read(record.image)))
    except Exception as error:  # the message is all we want here
        return f"TF cannot decode it: {str(error).splitlines()[0][:200]}"
    return "TF cannot decode it at reduced scale"
