"""Checkpoint readers: exact round trips against torch, refusal of malicious pickles, clear errors on bad files.

torch (and transformers) only make the fixtures; tests that need them skip when torch is absent.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from medclip.checkpoints.readers import (
    CheckpointError,
    UnsafeCheckpointError,
    find_checkpoint_file,
    read_checkpoint,
    read_flax_msgpack,
    read_safetensors,
    read_torch_bin,
)

READERS_PY = Path(__file__).resolve().parents[1] / "medclip" / "checkpoints" / "readers.py"
FORMATS = {"zip": True, "legacy": False}  # value: torch.save's _use_new_zipfile_serialization


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def _save(torch, obj, path: Path, fmt: str) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=FORMATS[fmt])
    return path


def _as_numpy(tensor) -> np.ndarray:
    """torch's exact values; bf16 goes through its bits because torch cannot hand numpy a bf16 array."""
    import torch

    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _assert_same(ours: dict[str, np.ndarray], theirs: dict) -> None:
    assert list(ours) == list(theirs)
    for key, tensor in theirs.items():
        expected = _as_numpy(tensor)
        assert ours[key].dtype == expected.dtype, key
        assert ours[key].shape == expected.shape, key
        np.testing.assert_array_equal(ours[key], expected, err_msg=key)
        assert ours[key].flags.c_contiguous and ours[key].flags.owndata, key


def _tricky_state_dict(torch) -> dict:
    torch.manual_seed(0)
    shared = torch.arange(20, dtype=torch.float32)
    weight = torch.randn(5, 3)
    return collections.OrderedDict(
        fp32=torch.randn(3, 4),
        fp16=torch.randn(2, 3).half(),
        bf16=torch.randn(7).bfloat16(),
        int64=torch.arange(-3, 6, dtype=torch.int64).reshape(3, 3),
        logit_scale=torch.tensor(2.6592),  # 0-d
        transposed=torch.randn(4, 6).t(),  # non-contiguous: stride (1, 6)
        view_a=shared[2:8].view(2, 3),  # two views of one storage, with offsets
        view_b=shared[10:20:3],  # offset and stride 3
        tied_1=weight,  # tied weights: one tensor under two names
        tied_2=weight,
        mask=torch.tensor([True, False, True]),
        empty=torch.zeros(0, 4),
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_torch_round_trip_dtypes_views_and_shared_storage(torch, tmp_path, fmt):
    state = _tricky_state_dict(torch)
    assert not state["transposed"].is_contiguous()
    assert state["view_a"].untyped_storage().data_ptr() == state["view_b"].untyped_storage().data_ptr()
    path = _save(torch, state, tmp_path / "pytorch_model.bin", fmt)

    ours = read_torch_bin(path)

    _assert_same(ours, state)
    assert ours["logit_scale"].shape == () and ours["bf16"].dtype == ml_dtypes.bfloat16
    ours["tied_1"][0, 0] = 123.0  # each name owns its copy, even for tied weights
    assert ours["tied_2"][0, 0] != 123.0


@pytest.mark.parametrize("fmt", FORMATS)
def test_transformers_bert_state_dict(torch, tmp_path, fmt):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64,
    )  # fmt: skip
    state = transformers.BertModel(config).state_dict()
    path = _save(torch, state, tmp_path / "pytorch_model.bin", fmt)

    ours = read_checkpoint(path)

    _assert_same(ours, state)
    assert ours["encoder.layer.1.attention.self.query.weight"].shape == (32, 32)


def test_nested_checkpoint_flattens_and_skips_non_tensors(torch, tmp_path):
    path = _save(torch, {"epoch": 3, "model": {"w": torch.ones(2)}, "name": "run1"}, tmp_path / "c.pt", "zip")
    ours = read_checkpoint(path)
    assert list(ours) == ["model.w"]
    np.testing.assert_array_equal(ours["model.w"], np.ones(2, np.float32))


class _StorageRef:
    def __init__(self, view=None):
        self.view = view  # legacy view metadata: (view_key, offset, numel) into the root storage


class _FakeTensor:
    """Pickles as the same ``_rebuild_tensor_v2(...)`` call that torch writes for a tensor."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        import torch

        return torch._utils._rebuild_tensor_v2, self.args


def _write_legacy(torch, path: Path, state, root: np.ndarray) -> Path:
    """Hand-write the legacy format around one float32 storage ``root``, as torch's ``_legacy_save`` does."""

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _StorageRef):
                return ("storage", torch.FloatStorage, "root", "cpu", root.size, obj.view)
            return None

    with path.open("wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, f, protocol=2)
        Pickler(f, protocol=2).dump(state)
        pickle.dump(["root"], f, protocol=2)
        f.write(struct.pack("<q", root.size) + root.tobytes())
    return path


def test_legacy_storage_views_match_torch(torch, tmp_path):
    """Old torch wrote view storages as ('storage', type, root_key, loc, numel, (view_key, offset, numel))."""
    root = np.arange(10, dtype=np.float32)
    state = collections.OrderedDict(
        whole=_FakeTensor(_StorageRef(), 0, (2, 5), (5, 1)),
        in_view=_FakeTensor(_StorageRef(("view1", 2, 5)), 1, (2,), (1,)),  # root[2:7][1:3] == [3, 4]
    )
    path = _write_legacy(torch, tmp_path / "old.bin", state, root)

    ours = read_torch_bin(path)

    np.testing.assert_array_equal(ours["whole"], root.reshape(2, 5))
    np.testing.assert_array_equal(ours["in_view"], np.array([3.0, 4.0], np.float32))
    _assert_same(ours, torch.load(path, weights_only=False))


@pytest.mark.parametrize(
    ("offset", "size", "stride"),
    [(8, (3,), (1,)), (0, (2, 6), (5, 1)), (0, (2,), (-1,)), (0, (2,), (1.5,)), (10, (), ())],
)
def test_tensor_outside_its_storage_is_refused(torch, tmp_path, offset, size, stride):
    """as_strided does no bounds checks; a crafted layout must not read memory past the storage."""
    state = {"w": _FakeTensor(_StorageRef(), offset, size, stride)}
    path = _write_legacy(torch, tmp_path / "crafted.bin", state, np.arange(10, dtype=np.float32))
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        read_torch_bin(path)


def test_pickle_cannot_rewrite_the_allow_list(torch, tmp_path):
    """BUILD on an allowed global (``torch.FloatStorage``) must fail, not retarget later loads to int8."""
    rewrite = b"\x80\x02ctorch\nFloatStorage\nN}X\x05\x00\x00\x00dtypeX\x02\x00\x00\x00i1s\x86b0"
    state = {"w": _FakeTensor(_StorageRef(), 0, (3,), (1,))}
    path = _write_legacy(torch, tmp_path / "crafted.bin", state, np.ones(3, np.float32))
    data = path.read_bytes()
    body = data.index(pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2))
    body += len(pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2))
    path.write_bytes(data[:body] + rewrite + data[body + 2 :])  # splice into the state pickle, after PROTO

    with pytest.raises(CheckpointError, match="read-only"):
        read_torch_bin(path)
    clean = _save(torch, {"w": torch.ones(3)}, tmp_path / "clean.bin", "legacy")
    assert read_torch_bin(clean)["w"].dtype == np.float32


class _ShellCommand:
    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


class _Eval:
    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return eval, (f"open({str(self.sentinel)!r}, 'w').close()",)


class _ArbitraryObject:
    pass


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("payload", "global_name"),
    [(_ShellCommand, f"{os.system.__module__}.system"), (_Eval, "builtins.eval")],
)
def test_malicious_pickle_is_refused_before_running(torch, tmp_path, fmt, payload, global_name):
    sentinel = tmp_path / "pwned"
    path = _save(torch, {"w": torch.ones(2), "evil": payload(sentinel)}, tmp_path / "pytorch_model.bin", fmt)

    with pytest.raises(UnsafeCheckpointError, match=re.escape(global_name)) as info:
        read_checkpoint(path)

    assert str(path) in str(info.value) and "NOT executed" in str(info.value)
    assert not sentinel.exists()
    torch.load(path, weights_only=False)  # the fixture really is live: an unrestricted load runs it
    assert sentinel.exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_arbitrary_class_is_refused(torch, tmp_path, fmt):
    path = _save(torch, {"w": torch.ones(2), "obj": _ArbitraryObject()}, tmp_path / "model.pt", fmt)
    with pytest.raises(UnsafeCheckpointError, match=r"test_checkpoint_readers\._ArbitraryObject"):
        read_torch_bin(path)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("keep", [0.1, 0.5, -3])
def test_truncated_torch_file(torch, tmp_path, fmt, keep):
    state = {"w": torch.randn(64, 64), "b": torch.randn(64)}
    data = _save(torch, state, tmp_path / "full.bin", fmt).read_bytes()
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(data[: int(len(data) * keep)] if keep > 0 else data[:keep])

    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        read_torch_bin(path)


def test_zip_missing_storage_record(torch, tmp_path):
    source = _save(torch, {"w": torch.ones(3)}, tmp_path / "full.bin", "zip")
    path = tmp_path / "broken.bin"
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            if not info.filename.endswith("/data/0"):
                dst.writestr(info, src.read(info))
    with pytest.raises(CheckpointError, match="missing from the archive"):
        read_torch_bin(path)


@pytest.mark.parametrize("byteorder", ["little", "big"])
@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_rezipped_archive(torch, tmp_path, byteorder, compression):
    """Archives rewritten by other zip tools: unaligned or compressed records, and a big-endian byte order."""
    state = {"w": torch.randn(3, 4), "t": torch.randn(4, 3).t()}
    source = _save(torch, state, tmp_path / "full.bin", "zip")
    path = tmp_path / "rezipped.bin"
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(path, "w", compression) as dst:
        for info in src.infolist():
            data = src.read(info)
            if byteorder == "big" and "/data/" in info.filename:
                data = np.frombuffer(data, "<f4").astype(">f4").tobytes()
            if info.filename.endswith("/byteorder"):
                data = byteorder.encode()
            dst.writestr(info.filename, data)

    _assert_same(read_torch_bin(path), state)


def test_bad_files_name_the_file(tmp_path):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    cases = {
        "empty.bin": b"",
        "noise.bin": noise,
        "pickle_noise.bin": b"\x80\x02" + noise,
        "empty.safetensors": b"",
        "bad_header.safetensors": struct.pack("<Q", 16) + b"{not json!!!!!!}",
        "huge_header.safetensors": struct.pack("<Q", 10**12) + b"{}",
        "noise.msgpack": noise,
        "weights.h5": b"\x89HDF",
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=re.escape(str(path))):
            read_checkpoint(path)


def test_safetensors_with_bf16(tmp_path):
    from safetensors.numpy import save_file

    tensors = {
        "fp32": np.arange(12, dtype=np.float32).reshape(3, 4),
        "fp16": np.linspace(-1, 1, 5).astype(np.float16),
        "bf16": np.array([1.5, -2.25, 3e38], dtype=ml_dtypes.bfloat16),
        "int64": np.arange(4, dtype=np.int64),
        "logit_scale": np.array(2.6592, dtype=np.float32),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)

    ours = read_safetensors(path)

    assert set(ours) == set(tensors)
    for key, expected in tensors.items():
        assert ours[key].dtype == expected.dtype and ours[key].shape == expected.shape, key
        np.testing.assert_array_equal(ours[key], expected, err_msg=key)


def test_safetensors_bf16_written_by_torch(torch, tmp_path):
    from safetensors.torch import save_file

    state = {"w": torch.randn(3, 5).bfloat16(), "s": torch.tensor(1.0)}
    save_file(state, tmp_path / "model.safetensors")
    _assert_same_values(read_checkpoint(tmp_path / "model.safetensors"), state)


def _assert_same_values(ours: dict[str, np.ndarray], theirs: dict) -> None:
    assert set(ours) == set(theirs)
    for key, tensor in theirs.items():
        np.testing.assert_array_equal(ours[key], _as_numpy(tensor), err_msg=key)
        assert ours[key].dtype == _as_numpy(tensor).dtype


def test_flax_msgpack_nested(tmp_path):
    from flax import serialization

    kernel = np.arange(6, dtype=np.float32).reshape(2, 3)
    tree = {
        "text_model": {"encoder": {"layer": {"0": {"attention": {"self": {"query": {"kernel": kernel}}}}}}},
        "logit_scale": np.array(2.6592, dtype=np.float32),
        "vision": {"proj": np.ones(4, dtype=ml_dtypes.bfloat16)},
    }
    path = tmp_path / "flax_model.msgpack"
    path.write_bytes(serialization.msgpack_serialize(tree))

    ours = read_checkpoint(path)

    assert set(ours) == {"text_model.encoder.layer.0.attention.self.query.kernel", "logit_scale", "vision.proj"}
    np.testing.assert_array_equal(ours["text_model.encoder.layer.0.attention.self.query.kernel"], kernel)
    assert ours["logit_scale"].shape == () and ours["vision.proj"].dtype == ml_dtypes.bfloat16
    assert read_flax_msgpack(path).keys() == ours.keys()


def _write_index(folder: Path, name: str, weight_map: dict[str, str]) -> Path:
    path = folder / name
    path.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return path


def test_sharded_safetensors(tmp_path):
    from safetensors.numpy import save_file

    shard_1 = {"a.weight": np.ones((2, 2), np.float32), "a.bias": np.zeros(2, np.float32)}
    shard_2 = {"b.weight": np.full((3,), 7, ml_dtypes.bfloat16)}
    save_file(shard_1, tmp_path / "model-00001-of-00002.safetensors")
    save_file(shard_2, tmp_path / "model-00002-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in shard_1}
    weight_map |= {k: "model-00002-of-00002.safetensors" for k in shard_2}
    index = _write_index(tmp_path, "model.safetensors.index.json", weight_map)

    ours = read_checkpoint(index)

    assert set(ours) == set(weight_map)
    np.testing.assert_array_equal(ours["b.weight"], shard_2["b.weight"])
    assert find_checkpoint_file(tmp_path) == index and read_checkpoint(tmp_path).keys() == ours.keys()

    _write_index(tmp_path, "bad.index.json", weight_map | {"c.weight": "model-00002-of-00002.safetensors"})
    with pytest.raises(CheckpointError, match=r"c\.weight"):
        read_checkpoint(tmp_path / "bad.index.json")
    _write_index(tmp_path, "gone.index.json", {"x": "model-00003-of-00003.safetensors"})
    with pytest.raises(CheckpointError, match="model-00003-of-00003.safetensors"):
        read_checkpoint(tmp_path / "gone.index.json")


def test_sharded_torch_bins(torch, tmp_path):
    shards = {"pytorch_model-00001-of-00002.bin": {"x": torch.randn(3)}, "pytorch_model-00002-of-00002.bin": {}}
    shards["pytorch_model-00002-of-00002.bin"] = {"y": torch.arange(4), "z": torch.randn(2, 2).bfloat16()}
    weight_map = {}
    for (name, state), fmt in zip(shards.items(), FORMATS):
        _save(torch, state, tmp_path / name, fmt)
        weight_map |= dict.fromkeys(state, name)
    index = _write_index(tmp_path, "pytorch_model.bin.index.json", weight_map)

    _assert_same_values(read_checkpoint(index), {k: v for s in shards.values() for k, v in s.items()})


def test_find_checkpoint_file_preference(tmp_path):
    names = ["flax_model.msgpack", "pytorch_model.bin.index.json", "pytorch_model.bin",
             "model.safetensors.index.json", "model.safetensors"]  # fmt: skip
    for name in names:
        (tmp_path / name).write_bytes(b"")
    for name in reversed(names):  # best first; remove it and the next best wins
        assert find_checkpoint_file(tmp_path) == tmp_path / name
        (tmp_path / name).unlink()

    (tmp_path / "tf_model.h5").write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        find_checkpoint_file(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "tf_model.h5" in message
    assert all(name in message for name in names)
    with pytest.raises(CheckpointError, match="not a folder"):
        find_checkpoint_file(tmp_path / "missing")


def test_reader_runs_without_torch(torch, tmp_path):
    """medclip never imports torch: read both formats in a process where importing torch fails."""
    state = {"w": torch.randn(2, 3).t(), "h": torch.ones(2).half()}
    for fmt in FORMATS:
        _save(torch, state, tmp_path / f"{fmt}.bin", fmt)
    script = f"""
import importlib.util, sys
sys.modules["torch"] = None  # any 'import torch' now raises
spec = importlib.util.spec_from_file_location("readers", {str(READERS_PY)!r})
readers = sys.modules["readers"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(readers)
for fmt in {list(FORMATS)!r}:
    out = readers.read_torch_bin({str(tmp_path)!r} + f"/{{fmt}}.bin")
    print(fmt, sorted(out), out["w"].shape, out["h"].dtype)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "zip ['h', 'w'] (3, 2) float16",
        "legacy ['h', 'w'] (3, 2) float16",
    ]
