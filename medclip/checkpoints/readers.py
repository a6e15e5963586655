"""Read Hugging Face checkpoint files into flat ``{name: np.ndarray}`` dicts, without torch.

Why this exists: medclip converts Hub weights (BERT, ViT, CLIP towers) into Flax NNX modules and must not
need torch just to open a ``pytorch_model.bin``. Pickle is also a code-execution format, so the torch reader
below resolves only the few globals a tensor state dict needs and refuses anything else *before* it runs.

Keys come back exactly as stored (``"encoder.layer.0.attention.self.query.weight"``); mapping them onto our
modules is the job of the per-model conversion code, not of this file.
"""

from __future__ import annotations

import _compat_pickle
import collections
import json
import mmap
import pickle
import struct
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

__all__ = [
    "CheckpointError",
    "UnsafeCheckpointError",
    "find_checkpoint_file",
    "read_checkpoint",
    "read_flax_msgpack",
    "read_npz",
    "read_safetensors",
    "read_torch_bin",
]

# In the order we prefer them: safetensors needs no pickle and maps straight into memory.
CHECKPOINT_FILE_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "flax_model.msgpack",
)
_TORCH_SUFFIXES = (".bin", ".pt", ".pth")
_REDOWNLOAD = "The file may be truncated or corrupt; delete it and download it again."


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, truncated or in a format we do not read."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle asked for a global outside the tensor allow-list; nothing it asked for was run."""


# --------------------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------------------


def find_checkpoint_file(folder: str | Path) -> Path:
    """Return the weights file of a downloaded model folder, preferring safetensors over pickles."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder; pass the directory that holds the model's weights.")
    for name in CHECKPOINT_FILE_NAMES:
        if (folder / name).is_file():
            return folder / name
    present = sorted(p.name for p in folder.iterdir())[:20]
    raise CheckpointError(
        f"{folder}: no weights file found; looked for {', '.join(CHECKPOINT_FILE_NAMES)} "
        f"but the folder holds {present or 'nothing'}. Download the model's weights into it."
    )


def read_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """Read any supported checkpoint (file, sharded index, or model folder) by its file name."""
    path = Path(path)
    if path.is_dir():
        path = find_checkpoint_file(path)
    if path.name.endswith(".index.json"):
        return _read_sharded(path)
    return _read_single(path)


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Read a ``.safetensors`` file; bf16 tensors come back as ``ml_dtypes.bfloat16`` arrays."""
    import safetensors.numpy

    path = Path(path)
    try:
        return dict(safetensors.numpy.load_file(path))
    except Exception as e:  # SafetensorError, OSError, dtype errors: all mean "cannot use this file"
        raise CheckpointError(f"{path}: could not read safetensors file ({e}). {_REDOWNLOAD}") from e


def read_flax_msgpack(path: str | Path) -> dict[str, np.ndarray]:
    """Read a transformers ``flax_model.msgpack``, flattening the nested params to '.'-joined keys.

    The arrays are read-only views on the decoded payload (copying them would double peak memory).
    """
    from flax import serialization

    path = Path(path)
    try:
        tree = serialization.msgpack_restore(path.read_bytes())
    except Exception as e:  # msgpack raises a zoo of ValueError/ExtraData/UnpackValueError
        raise CheckpointError(f"{path}: could not decode Flax msgpack ({e}). {_REDOWNLOAD}") from e
    if not isinstance(tree, Mapping):
        raise CheckpointError(f"{path}: expected a nested dict of parameters, got {type(tree).__name__}.")
    out: dict[str, np.ndarray] = {}
    _flatten(tree, "", out, leaf=lambda v: np.asarray(v))
    return out


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Read a NumPy ``.npz`` of named arrays (big_vision's checkpoints), without pickles; bfloat16 arrays, which
    NumPy stores as 2-byte void, come back as ``ml_dtypes.bfloat16``."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:  # pickled objects, a broken zip: not usable
        raise CheckpointError(f"{path}: could not read .npz file ({e}). {_REDOWNLOAD}") from e
    return {k: v.view(ml_dtypes.bfloat16) if v.dtype.kind == "V" and v.itemsize == 2 else v
            for k, v in arrays.items()}


def read_torch_bin(path: str | Path) -> dict[str, np.ndarray]:
    """Read a ``torch.save`` state dict (zip or legacy format) with a restricted unpickler; torch not needed.

    Every tensor is copied exactly once out of a read-only memory map, so it is contiguous and owns its data.
    Nested dicts (``{"state_dict": {...}}``) are flattened with '.'; non-tensor leaves such as an epoch
    counter carry no weights and are skipped.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size == 0:
            raise CheckpointError(f"{path}: file is empty (0 bytes). {_REDOWNLOAD}")
        with path.open("rb") as f:
            head = f.read(512)
        if head[:4] == b"PK\x03\x04":  # decide by the first bytes: legacy tensor data may contain "PK\x05\x06"
            return _read_torch_zip(path)
        if head[:1] == b"\x80":  # pickle PROTO opcode
            return _read_torch_legacy(path)
        if head[257:262] == b"ustar":
            raise CheckpointError(
                f"{path}: PyTorch's pre-0.4 tar format is not supported; load it once with torch and re-save "
                "it with torch.save(state_dict) or as safetensors."
            )
        raise CheckpointError(f"{path}: neither a torch zip archive nor a legacy torch pickle. {_REDOWNLOAD}")
    except CheckpointError:
        raise
    except Exception as e:  # the unpickler never runs foreign code, so any other error means a bad file
        raise CheckpointError(
            f"{path}: could not read PyTorch checkpoint ({type(e).__name__}: {e}). {_REDOWNLOAD}"
        ) from e


# --------------------------------------------------------------------------------------------------------------
# Dispatch and shards
# --------------------------------------------------------------------------------------------------------------


def _read_single(path: Path) -> dict[str, np.ndarray]:
    name = path.name.lower()
    if name.endswith(".safetensors"):
        return read_safetensors(path)
    if name.endswith(_TORCH_SUFFIXES):
        return read_torch_bin(path)
    if name.endswith(".msgpack"):
        return read_flax_msgpack(path)
    if name.endswith(".npz"):
        return read_npz(path)
    raise CheckpointError(
        f"{path}: unsupported checkpoint type; expected .safetensors, {'/'.join(_TORCH_SUFFIXES)}, .msgpack, .npz "
        "or a *.index.json of shards."
    )


def _read_sharded(index: Path) -> dict[str, np.ndarray]:
    """Load every shard named in ``weight_map`` once and check each listed key really was in its shard."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a readable shard index with a 'weight_map' ({e}).") from e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names.")
    keys_by_shard: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        keys_by_shard.setdefault(shard, []).append(key)
    out: dict[str, np.ndarray] = {}
    for shard, keys in keys_by_shard.items():
        shard_path = index.parent / shard
        if not shard_path.is_file():
            raise CheckpointError(f"{index}: lists shard {shard!r}, but {shard_path} is missing; download it.")
        tensors = _read_single(shard_path)
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise CheckpointError(
                f"{index}: {len(missing)} tensors listed for {shard_path} are not in it (e.g. {missing[:3]}); "
                "the shard and the index come from different downloads."
            )
        out.update(tensors)
    return out


def _flatten(tree: Mapping, prefix: str, out: dict[str, np.ndarray], leaf: Callable[[Any], Any]) -> None:
    """Walk nested mappings; ``leaf`` returns an array to keep, or None to skip that value."""
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            _flatten(value, name + ".", out, leaf)
        elif (array := leaf(value)) is not None:
            out[name] = array


# --------------------------------------------------------------------------------------------------------------
# torch.save pickles: the allow-list, implemented in numpy
# --------------------------------------------------------------------------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
_TORCH_DTYPES = {
    name: np.dtype(dtype)
    for names, dtype in [
        (("float32", "float"), np.float32),
        (("float64", "double"), np.float64),
        (("float16", "half"), np.float16),
        (("bfloat16",), ml_dtypes.bfloat16),
        (("int64", "long"), np.int64),
        (("int32", "int"), np.int32),
        (("int16", "short"), np.int16),
        (("int8",), np.int8),
        (("uint8",), np.uint8),
        (("bool",), np.bool_),
    ]
    for name in names
}
_TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_TORCH_PROTOCOL = 1001  # torch.serialization.PROTOCOL_VERSION


class _ReadOnly:
    """Base for every object a pickle can reach: no ``__dict__``, no ``__setstate__`` and no ``__setattr__``,
    so a BUILD opcode cannot rewrite the shared allow-list entries (and through them later loads)."""

    __slots__ = ()

    def __init__(self, **fields: Any):
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")


class _Global(_ReadOnly):
    """An allowed callable, e.g. ``torch._utils._rebuild_tensor_v2``, implemented by ``fn``."""

    __slots__ = ("fn",)

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


class _TorchType(_ReadOnly):
    """Stands in for ``torch.FloatStorage`` and friends (and ``torch.float32``): all they tell us is a dtype."""

    __slots__ = ("name", "dtype")


class _Storage(_ReadOnly):
    """One saved storage; ``data`` (1-D, read-only, over the memory map) is attached once its bytes are found.

    A legacy view storage points at its ``root`` storage plus an element ``offset``.
    """

    __slots__ = ("key", "dtype", "numel", "root", "offset", "data")

    def attach(self, data: np.ndarray | None) -> None:
        object.__setattr__(self, "data", data)

    def array(self) -> np.ndarray:  # (numel,)
        if self.root is not None:
            return self.root.array()[self.offset : self.offset + self.numel]
        if self.data is None:
            raise ValueError(f"storage {self.key!r} is referenced but its bytes were never found")
        return self.data


class _TensorRef(_ReadOnly):
    """What ``_rebuild_tensor_v2`` returns: legacy files store the tensor bytes only after the pickle."""

    __slots__ = ("storage", "offset", "size", "stride")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None) -> _TensorRef:  # fmt: skip
    if not isinstance(storage, _Storage):
        raise ValueError(f"_rebuild_tensor_v2 got {type(storage).__name__} instead of a storage")
    if metadata:  # conj/neg bits of lazily conjugated complex views: never in a state dict of real weights
        raise ValueError(f"tensor metadata {metadata!r} is not supported")
    size, stride = tuple(size), tuple(stride)
    if len(size) != len(stride) or not all(_is_count(v) for v in (storage_offset, *size, *stride)):
        raise ValueError(f"bad tensor layout: offset={storage_offset!r} size={size!r} stride={stride!r}")
    return _TensorRef(storage=storage, offset=storage_offset, size=size, stride=stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None) -> Any:
    return data  # an nn.Parameter is its tensor for our purposes


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _Global(fn=_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_parameter"): _Global(fn=_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _Global(fn=_rebuild_parameter),
    ("collections", "OrderedDict"): collections.OrderedDict,  # a built-in type: immutable
    **{("torch", n): _TorchType(name=n, dtype=d) for n, d in (_STORAGE_DTYPES | _TORCH_DTYPES).items()},
}


class _TorchUnpickler(pickle.Unpickler):
    """Resolves only ``_ALLOWED_GLOBALS``; storages are recorded in ``storages`` for their bytes to be attached."""

    def __init__(self, file: BinaryIO, path: Path):
        super().__init__(file)
        self.path = path
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles spell Python 3 names the Python 2 way ('__builtin__.eval'); say what they mean.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        target = _ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise UnsafeCheckpointError(
                f"{self.path}: refused to load global '{module}.{name}', which is not needed to rebuild "
                "tensors; it was NOT executed. Only load this file with torch if you trust its source, and "
                "re-save it as a plain state dict (torch.save(model.state_dict())) or as safetensors."
            )
        return target

    def persistent_load(self, pid: Any) -> _Storage:
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) or _ascii(pid[0]) != "storage":
            raise ValueError(f"unknown persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1:5]
        is_storage_type = isinstance(storage_type, _TorchType) and storage_type.name.endswith("Storage")
        if not is_storage_type or not _is_count(numel):
            raise ValueError(f"bad storage reference {pid!r}")
        key = _ascii(key)
        if key not in self.storages:
            dtype = storage_type.dtype
            self.storages[key] = _Storage(key=key, dtype=dtype, numel=numel, root=None, offset=0, data=None)
        root = self.storages[key]
        view = pid[5] if len(pid) == 6 else None  # legacy only: (view_key, offset, numel) into the root
        if view is None:
            return root
        view_key, offset, view_numel = _ascii(view[0]), view[1], view[2]
        if not (_is_count(offset) and _is_count(view_numel) and offset + view_numel <= root.numel):
            raise ValueError(f"bad storage view {view!r} of a {root.numel}-element storage")
        if view_key not in self.storages:
            self.storages[view_key] = _Storage(
                key=view_key, dtype=root.dtype, numel=view_numel, root=root, offset=offset, data=None
            )
        return self.storages[view_key]


def _ascii(value: Any) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


# --------------------------------------------------------------------------------------------------------------
# torch.save on-disk formats
# --------------------------------------------------------------------------------------------------------------


@contextmanager
def _mapped(path: Path) -> Iterator[mmap.mmap]:
    with path.open("rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        yield mm
    finally:
        try:
            mm.close()
        except BufferError:  # arrays in an error's traceback still view the map; it goes away with them
            pass


def _read_torch_zip(path: Path) -> dict[str, np.ndarray]:
    """torch >= 1.6: ``<archive>/data.pkl`` plus one uncompressed record per storage, ``<archive>/data/<key>``."""
    with zipfile.ZipFile(path) as zf, _mapped(path) as mm:
        names = zf.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pickles:
            if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
                raise CheckpointError(
                    f"{path}: this is a TorchScript archive, not a state dict; re-save the weights with "
                    "torch.save(model.state_dict())."
                )
            raise CheckpointError(f"{path}: zip archive without <archive>/data.pkl; not a torch.save file.")
        prefix = pickles[0][: -len("data.pkl")]
        big_endian = prefix + "byteorder" in names and zf.read(prefix + "byteorder").strip() == b"big"
        with zf.open(pickles[0]) as pickle_file:
            unpickler = _TorchUnpickler(pickle_file, path)
            state = unpickler.load()
        for storage in unpickler.storages.values():
            if storage.root is None:
                storage.attach(_zip_record(zf, mm, f"{prefix}data/{storage.key}", storage))
        return _materialize(state, unpickler.storages, path, swap_bytes=big_endian)


def _zip_record(zf: zipfile.ZipFile, mm: mmap.mmap, name: str, storage: _Storage) -> np.ndarray:
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise ValueError(f"storage record {name!r} is missing from the archive") from None
    nbytes = storage.numel * storage.dtype.itemsize
    if info.file_size < nbytes:
        raise ValueError(f"storage record {name!r} holds {info.file_size} bytes, expected {nbytes}")
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:  # re-zipped by some tool: read it
        return np.frombuffer(zf.read(name), storage.dtype, storage.numel)
    header = mm[info.header_offset : info.header_offset + 30]
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise ValueError(f"bad local zip header for {name!r}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])  # the local header's own lengths, not the index's
    offset = info.header_offset + 30 + name_len + extra_len
    return np.frombuffer(mm, storage.dtype, storage.numel, offset=offset)


def _read_torch_legacy(path: Path) -> dict[str, np.ndarray]:
    """``_use_new_zipfile_serialization=False``: magic, protocol, sys_info and object pickles, the storage
    key list, then per key an int64 little-endian element count and that storage's little-endian bytes."""
    with path.open("rb") as f, _mapped(path) as mm:
        if _TorchUnpickler(f, path).load() != _TORCH_MAGIC:
            raise CheckpointError(f"{path}: starts with a pickle but not torch's magic number; not a torch file.")
        if (version := _TorchUnpickler(f, path).load()) != _TORCH_PROTOCOL:
            raise CheckpointError(f"{path}: unsupported legacy torch protocol version {version!r}.")
        _TorchUnpickler(f, path).load()  # sys_info: legacy storage bytes are little-endian regardless
        unpickler = _TorchUnpickler(f, path)
        state = unpickler.load()
        keys = _TorchUnpickler(f, path).load()
        if not isinstance(keys, list):
            raise ValueError(f"expected the list of storage keys after the pickle, got {type(keys).__name__}")
        pos = f.tell()
        for key in map(_ascii, keys):
            if key not in unpickler.storages:
                raise ValueError(f"storage key {key!r} is not referenced by the pickle")
            storage = unpickler.storages[key]
            if pos + 8 > len(mm):
                raise ValueError(f"file ends before storage {key!r}")
            (count,) = struct.unpack("<q", mm[pos : pos + 8])
            if count != storage.numel:
                raise ValueError(f"storage {key!r} has {count} elements on disk, expected {storage.numel}")
            end = pos + 8 + count * storage.dtype.itemsize
            if end > len(mm):
                raise ValueError(f"file ends inside storage {key!r} ({end - len(mm)} bytes missing)")
            storage.attach(np.frombuffer(mm, storage.dtype, count, offset=pos + 8))
            pos = end
        return _materialize(state, unpickler.storages, path, swap_bytes=False)


def _materialize(
    state: Any, storages: dict[str, _Storage], path: Path, swap_bytes: bool
) -> dict[str, np.ndarray]:
    """Turn every ``_TensorRef`` in the unpickled state dict into an owned, contiguous numpy array. A file holding
    one bare tensor (`torch.save(parameter)`, as PMC-CLIP's text_projection_layer.pth) gives {"": tensor}."""
    if isinstance(state, _TensorRef):
        state = {"": state}
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state_dict), got {type(state).__name__}.")
    out: dict[str, np.ndarray] = {}
    _flatten(state, "", out, leaf=lambda v: _tensor(v, swap_bytes) if isinstance(v, _TensorRef) else None)
    for storage in storages.values():  # drop views of the memory map so it can be closed
        storage.attach(None)
    return out


def _tensor(ref: _TensorRef, swap_bytes: bool) -> np.ndarray:
    flat = ref.storage.array()  # (numel,)
    if 0 in ref.size:
        return np.zeros(ref.size, flat.dtype)
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
    if last >= flat.size:  # as_strided does no bounds checks: never let a corrupt file read past the storage
        raise ValueError(f"tensor of size {ref.size} reaches past the end of its {flat.size}-element storage")
    item = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[ref.offset :], shape=ref.size, strides=[s * item for s in ref.stride], writeable=False
    )
    array = np.array(view, order="C", copy=True)
    if swap_bytes and item > 1:
        array.view(f"u{item}").byteswap(inplace=True)
    return array
