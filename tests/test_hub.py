"""Hub ids resolve through huggingface_hub's cache when offline, and push_to_hub uploads a loadable folder
without ever printing the token. No network: the Hub API is replaced by a recorder."""

from __future__ import annotations

import os
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants as hub_constants
import numpy as np
import pytest
from flax import nnx

from medclip import FlaxHybridCLIP, HybridCLIPConfig


def _fake_cache(cache: Path, repo_id: str, model: FlaxHybridCLIP) -> None:
    """The on-disk layout huggingface_hub's cache uses: refs/main -> snapshots/<commit>/files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    model.save_pretrained(repo / "snapshots" / commit)


def test_hub_id_loads_from_cache_offline(tmp_path, monkeypatch):
    model = FlaxHybridCLIP(HybridCLIPConfig.tiny(), rngs=nnx.Rngs(3))
    _fake_cache(tmp_path, "someone/medclip-tiny", model)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    loaded = FlaxHybridCLIP.from_pretrained("someone/medclip-tiny")
    np.testing.assert_array_equal(np.asarray(loaded.visual_projection.kernel[...]),
                                  np.asarray(model.visual_projection.kernel[...]))


def test_uncached_hub_id_offline_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="not a local folder.*nor has it been cached"):
        FlaxHybridCLIP.from_pretrained("someone/not-downloaded")


class RecordingApi:
    uploaded: dict = {}

    def __init__(self, *args, **kwargs):
        pass

    def create_repo(self, repo_id, private=False, exist_ok=False, **kwargs):
        RecordingApi.uploaded["repo"] = (repo_id, private)

    def upload_folder(self, repo_id, folder_path, commit_message, **kwargs):
        RecordingApi.uploaded["files"] = sorted(os.listdir(folder_path))
        RecordingApi.uploaded["reloaded"] = FlaxHybridCLIP.from_pretrained(folder_path)
        RecordingApi.uploaded["card"] = (Path(folder_path) / "README.md").read_text()
        return "https://huggingface.co/someone/m/commit/abc"


def test_push_to_hub_uploads_a_loadable_folder_and_never_prints_the_token(monkeypatch, capsys, caplog):
    secret = "hf_SECRETtokenNeverPrinted"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    model = FlaxHybridCLIP(HybridCLIPConfig.tiny(), rngs=nnx.Rngs(0))
    url = model.push_to_hub("someone/m", private=True, model_card="# card\nNot for clinical use.")
    assert url.endswith("/commit/abc")
    assert RecordingApi.uploaded["repo"] == ("someone/m", True)
    assert {"config.json", "model.safetensors", "README.md"} <= set(RecordingApi.uploaded["files"])
    assert "Not for clinical use" in RecordingApi.uploaded["card"]
    reloaded = RecordingApi.uploaded["reloaded"]
    np.testing.assert_array_equal(np.asarray(reloaded.logit_scale[...]), np.asarray(model.logit_scale[...]))
    out = capsys.readouterr()
    assert secret not in out.out + out.err + caplog.text
