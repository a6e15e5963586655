"""One path layer for local folders and cloud buckets (`gs://`; `s3://`, `az://`, `hf://` with their fsspec packages).

A local path stays a `pathlib.Path` and behaves exactly as before; a URL becomes an etils `epath.Path`, the
pathlib-shaped object orbax already takes for checkpoints, with its fsspec backend (gcsfs for `gs://`, s3fs for
`s3://`) instead of TensorFlow's `tf.io.gfile`: gcsfs, google-cloud-storage and tensorstore (orbax's array
writer) can all be pointed at a local emulator, `tf.io.gfile` cannot, and one client for data, outputs and
checkpoints means one set of credentials and one kind of error. Code that takes a path calls `as_path` instead
of `Path`; a URL is never wrapped in `pathlib.Path` (which would turn `gs://b/x` into the local `gs:/b/x`).

Emulator: `STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT` points gcsfs at it; importing this module with it set
points tensorstore there too (`TENSORSTORE_GCS_HTTP_URL`, with a dummy token) and turns off gcsfs's gRPC
bucket-type probe and GCE metadata probe (neither answers locally), unless those are set already.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Union

from etils import epath

# epath picks tf.io.gfile for gs:// whenever TensorFlow is importable; medclip reads and writes through fsspec.
os.environ.setdefault("EPATH_USE_TF", "false")
if os.environ.get("STORAGE_EMULATOR_HOST"):  # a local GCS emulator: every client goes there, none probes Google
    _emulator = os.environ["STORAGE_EMULATOR_HOST"]
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", _emulator if "://" in _emulator else f"http://{_emulator}")
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # read when gcsfs is imported (lazily)
    os.environ.setdefault("NO_GCE_CHECK", "true")

AnyPath = Union[Path, epath.Path]
PathLike = Union[str, os.PathLike]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+://")
# The schemes etils epath serves through fsspec: gs (gcsfs, a dependency), s3 (s3fs), az (adlfs), hf (huggingface_hub).
SCHEMES = ("gs", "s3", "az", "hf")


class StorageError(OSError):
    """A bucket, object or folder that cannot be reached, in one line that names the URL."""


def is_url(path: Any) -> bool:
    """`scheme://...` (a bucket or other remote store), as opposed to a local path (or anything else)."""
    return isinstance(path, (str, os.PathLike)) and bool(_URL.match(str(os.fspath(path))))


def as_path(path: PathLike) -> AnyPath:
    """`pathlib.Path` for a local path, `epath.Path` for a URL; both support `/`, `open`, `is_file`, `iterdir`..."""
    if isinstance(path, (Path, epath.Path)):
        return path
    text = os.fspath(path)
    if not is_url(text):
        return Path(text)
    _check_scheme(text)
    return epath.Path(text)


def _check_scheme(url: str, what: str = "") -> None:
    scheme = url.split("://", 1)[0]
    if scheme not in SCHEMES:
        raise StorageError(f"{what + ' ' if what else ''}{url}: unsupported scheme {scheme}:// (medclip reads and "
                           f"writes {', '.join(f'{s}://' for s in SCHEMES)} and local paths)")


def join(base: PathLike, *parts: str) -> str:
    """`base/part/...` as a string, for APIs that take strings (TensorFlow, orbax, stored image paths)."""
    return str(as_path(base).joinpath(*parts))


def read_bytes(path: PathLike) -> bytes:
    if not is_url(path):
        with open(path, "rb") as f:
            return f.read()
    with _translated(path):
        _check_scheme(os.fspath(path))
        return _filesystem(path).cat_file(os.fspath(path))  # one request (epath's open asks for metadata first)


def read_many(paths: Sequence[PathLike], start: int | Sequence[int] | None = None,
              end: int | Sequence[int] | None = None) -> list[bytes | StorageError]:
    """Each file's bytes, in order, or the one-line StorageError that kept it from being read (so one bad object
    is a counted skip for the caller, not a failed batch). `start`/`end` (one for all, or one per path) read a byte
    range instead, fsspec's convention: [start, end), and a negative `start` alone is the last -start bytes (one
    suffix request).

    Objects in a bucket are requested concurrently on fsspec's IO loop (`cat_ranges`, one request each) from one
    blocking call, where one call per object would block its thread once per object; local files are read in
    turn."""
    starts = list(start) if isinstance(start, Sequence) else [start] * len(paths)
    ends = list(end) if isinstance(end, Sequence) else [end] * len(paths)
    out: list[bytes | StorageError] = [b""] * len(paths)
    by_scheme: dict[str, list[int]] = {}
    for i, path in enumerate(paths):
        text = os.fspath(path)
        if is_url(text):
            by_scheme.setdefault(text.split("://", 1)[0], []).append(i)
            continue
        try:
            out[i] = _read_local(text, starts[i], ends[i])
        except OSError as error:
            out[i] = StorageError(f"{text}: {first_line(error)}")
    for indices in by_scheme.values():
        urls = [os.fspath(paths[i]) for i in indices]
        try:
            _check_scheme(urls[0])
            with _translated(urls[0]):
                results = _filesystem(urls[0]).cat_ranges(urls, [starts[i] for i in indices],
                                                          [ends[i] for i in indices], on_error="return")
        except StorageError as error:  # the scheme or its fsspec package: every object of it fails alike
            results = [error] * len(urls)
        for i, url, result in zip(indices, urls, results):
            out[i] = result if isinstance(result, bytes) else _as_storage_error(url, result)
    return out


def _read_local(path: str, start: int | None, end: int | None) -> bytes:
    with open(path, "rb") as f:
        if start is None and end is None:
            return f.read()
        size = os.fstat(f.fileno()).st_size
        begin = max(0, size + start) if start is not None and start < 0 else (start or 0)
        stop = size if end is None else min(size, end if end >= 0 else size + end)
        f.seek(begin)
        return f.read(max(0, stop - begin))


def _as_storage_error(url: str, error: BaseException) -> StorageError:
    """What `_translated` would raise for `error` on `url`, as a value."""
    try:
        with _translated(url):
            raise error
    except StorageError as translated:
        return translated
    except BaseException as other:  # not a client error we know: still one line naming the URL
        return StorageError(f"{url}: {type(other).__name__}: {first_line(other)}")


def _filesystem(url: PathLike):
    """The fsspec filesystem of the URL's scheme (gcsfs for gs://): one per process, as fsspec caches it."""
    import fsspec

    return fsspec.filesystem(os.fspath(url).split("://", 1)[0])


def write_bytes(path: PathLike, data: bytes) -> None:
    """Writes the whole file, creating local parent folders."""
    target = as_path(path)
    if isinstance(target, Path):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return
    with _translated(path):
        target.write_bytes(data)


def write_text(path: PathLike, text: str) -> None:
    """Writes the whole file (an object store has no partial writes), creating local parent folders."""
    target = as_path(path)
    if isinstance(target, Path):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        return
    with _translated(path):
        target.write_text(text, encoding="utf-8")


def append_text(path: PathLike, text: str) -> None:
    """Appends to a local file; an object is rewritten whole (logs are small, and objects cannot grow in place)."""
    target = as_path(path)
    if isinstance(target, Path):
        with target.open("a", encoding="utf-8") as f:
            f.write(text)
        return
    with _translated(path):
        before = target.read_text(encoding="utf-8") if target.exists() else ""
        target.write_text(before + text, encoding="utf-8")


def open_file(path: PathLike, mode: str = "rb", **kwargs: Any) -> IO:
    if not is_url(path):
        return open(path, mode, **kwargs)
    with _translated(path):
        return as_path(path).open(mode, **kwargs)


class _RangedObject(io.RawIOBase):
    """An object read front to back in ranged requests: `open_sequential`'s raw layer."""

    def __init__(self, url: str, size: int | None):
        self._url, self._fs, self._pos = url, _filesystem(url), 0
        if size is None:
            with _translated(url):
                size = self._fs.size(url)
        self._size = size  # a range past the end is an error (416), not an empty read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        end = min(self._pos + len(buffer), self._size)
        if end <= self._pos:
            return 0
        with _translated(self._url):
            data = self._fs.cat_file(self._url, self._pos, end)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_END:
            raise io.UnsupportedOperation("no seeks from the end")
        self._pos = offset if whence == io.SEEK_SET else self._pos + offset
        return self._pos

    def tell(self) -> int:
        return self._pos


def open_sequential(path: PathLike, chunk: int = 16 << 20, size: int | None = None) -> IO[bytes]:
    """A file read front to back in many small reads (TFRecord frames): an object in a bucket is fetched `chunk`
    bytes per request and the small reads are served from that buffer by io.BufferedReader. Through gcsfs's own
    file object each small read costs a round trip through fsspec's IO loop: a 256-example shard read 15x slower
    than in one request on the GCS emulator. `size`, when the caller knows it (a shard's, from the manifest), saves
    the object's metadata request. A local file is opened as usual."""
    if not is_url(path):
        return open(path, "rb")
    _check_scheme(os.fspath(path))
    return io.BufferedReader(_RangedObject(os.fspath(path), size), buffer_size=chunk)


def remove_tree(path: PathLike) -> None:
    target = as_path(path)
    if isinstance(target, Path):
        shutil.rmtree(target)
    else:
        with _translated(path):
            target.rmtree(missing_ok=True)


def files_under(folder: PathLike) -> list[str]:
    """Every file below `folder` (recursively), as paths or URLs, sorted."""
    root = as_path(folder)
    if isinstance(root, Path):
        return sorted(str(p) for p in root.rglob("*") if p.is_file())
    with _translated(folder):
        scheme = os.fspath(folder).split("://", 1)[0]
        found = (f"{str(top).rstrip('/')}/{name}" for top, _, names in root.walk() for name in names)
        return sorted(url if is_url(url) else f"{scheme}://{url}" for url in found)


@contextlib.contextmanager
def local_copy(path: Any) -> Iterator[Any]:
    """A local file or folder with the contents of `path`: `path` itself, unchanged, when it is not a URL (a local
    path, a Hub id, None), else a temporary download (for readers that need a real file: memory maps, zip
    archives, tokenizers)."""
    if not is_url(path):
        yield path
        return
    source = as_path(path)
    with tempfile.TemporaryDirectory(prefix="medclip-") as tmp:
        target = Path(tmp) / (source.name or "download")
        with _translated(path):
            if source.is_dir():
                for url in files_under(path):
                    local = target / url[len(str(source)):].lstrip("/")
                    local.parent.mkdir(parents=True, exist_ok=True)
                    local.write_bytes(as_path(url).read_bytes())
            else:
                target.write_bytes(source.read_bytes())
        yield target


def local_mirror(path: Any) -> Any:
    """Like `local_copy`, for objects used for the rest of the process (a model an embedder serves): downloaded
    once per URL, removed at exit."""
    if not is_url(path):
        return path
    key = os.fspath(path)
    if key not in _MIRRORS:
        stack = contextlib.ExitStack()
        _MIRRORS[key] = stack.enter_context(local_copy(key))
        atexit.register(stack.close)
    return _MIRRORS[key]


_MIRRORS: dict[str, Path] = {}


@contextlib.contextmanager
def staged_folder(path: Any) -> Iterator[Any]:
    """A folder to write into: `path` itself, unchanged, when local; for a URL, a temporary one whose files are
    uploaded to `path` on success (for writers that take only local paths: safetensors, tokenizers)."""
    if not is_url(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="medclip-") as tmp:
        yield Path(tmp)
        upload_folder(tmp, path)


def upload_folder(local: PathLike, url: PathLike) -> None:
    """Copies every file under the local folder to the same relative names under `url`."""
    target = as_path(url)
    with _translated(url):
        for file in sorted(Path(local).rglob("*")):
            if file.is_file():
                target.joinpath(*file.relative_to(local).parts).write_bytes(file.read_bytes())


def bucket_of(url: PathLike) -> str:
    """`gs://bucket` for `gs://bucket/a/b`."""
    scheme, rest = os.fspath(url).split("://", 1)
    return f"{scheme}://{rest.split('/', 1)[0]}"


def check_readable(path: PathLike | None, what: str, *, folder: bool | None = None) -> None:
    """Raises StorageError (one line, naming the URL) unless the URL exists (as a folder, when `folder`); local
    paths are left to the code that reads them, as before. Call before anything is built."""
    if path is None or not is_url(path):
        return
    _check_scheme(os.fspath(path), what)
    target = as_path(path)
    with _translated(path, what):
        _check_bucket(path, what)
        found = target.is_dir() if folder else target.exists() if folder is None else target.is_file()
    if not found:
        kind = "folder" if folder else "object"
        raise StorageError(f"{what} {path}: no such {kind} in bucket {bucket_of(path)}")


def check_writable(path: PathLike | None, what: str) -> None:
    """Raises StorageError unless the URL's bucket exists and takes a write (so credentials fail now, not at the
    first checkpoint)."""
    if path is None or not is_url(path):
        return
    _check_scheme(os.fspath(path), what)
    probe = as_path(path) / ".medclip-write-check"
    with _translated(path, what):
        _check_bucket(path, what)
        probe.write_bytes(b"")
        probe.unlink(missing_ok=True)


def _check_bucket(path: PathLike, what: str) -> None:
    _check_credentials(path, what)
    bucket = bucket_of(path)
    if not as_path(bucket).exists():
        raise StorageError(f"{what} {path}: bucket {bucket} does not exist (or these credentials cannot see it)")


def _check_credentials(path: PathLike, what: str) -> None:
    """Real GCS (no emulator) needs Application Default Credentials; gcsfs would otherwise fall back to anonymous
    access and fail later with a 401 on the first private object."""
    if not os.fspath(path).startswith("gs://") or os.environ.get("STORAGE_EMULATOR_HOST"):
        return
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        google.auth.default()
    except DefaultCredentialsError as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise StorageError(f"{what} {path}: no Google Cloud credentials ({first}); run `gcloud auth "
                           "application-default login` or set GOOGLE_APPLICATION_CREDENTIALS") from None


@contextlib.contextmanager
def _translated(path: PathLike, what: str = "") -> Iterator[None]:
    """Client errors (gcsfs HttpError, google.auth errors, FileNotFoundError with an API path) as one StorageError
    that names the URL."""
    label = f"{what} {path}" if what else str(path)
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError:
        raise StorageError(f"{label}: not found") from None
    except PermissionError as error:
        raise StorageError(f"{label}: permission denied ({first_line(error)})") from None
    except ImportError as error:  # the scheme's fsspec package (s3fs, adlfs) is not installed
        raise StorageError(f"{label}: {first_line(error)}") from None
    except Exception as error:
        if type(error).__module__.split(".")[0] in ("gcsfs", "google", "aiohttp", "s3fs", "botocore", "fsspec"):
            raise StorageError(f"{label}: {type(error).__name__}: {first_line(error)}") from None
        raise


def first_line(error: BaseException) -> str:
    """An error's message as one line (its first), or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
