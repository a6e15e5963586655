"""A local Google Cloud Storage API for the bucket tests: gcp-storage-emulator (a real JSON-API server, not a mock of
medclip.storage) on 127.0.0.1, started by the tests and stopped by its PID.

The environment it sets is what README says points medclip at an emulator: STORAGE_EMULATOR_HOST (gcsfs,
google-cloud-storage; medclip.storage copies it to tensorstore, orbax's array writer), no gRPC bucket-type probe
(GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: the emulator serves no gRPC and gcsfs would wait 60 s per bucket), and
no GCE metadata probe (NO_GCE_CHECK=true). Child processes inherit it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

BUCKET = "medclip-test"


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
    """Starts the emulator (in memory, one bucket), sets the environment for it; yields `gs://BUCKET`."""
    pytest.importorskip("gcp_storage_emulator")
    gcsfs = pytest.importorskip("gcsfs")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
                             "--port", str(port), "--in-memory", "--default-bucket", BUCKET],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "NO_GCE_CHECK": "true", "EPATH_USE_TF": "false"}
    saved = {key: os.environ.get(key) for key in env}
    try:
        _wait_for(port, proc)
        os.environ.update(env)
        gcsfs.GCSFileSystem.clear_instance_cache()  # a client made for another emulator must not be reused
        yield f"gs://{BUCKET}"
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        gcsfs.GCSFileSystem.clear_instance_cache()


def listing(url: str) -> list[str]:
    """Every object under `url`, read fresh from the server (gcsfs caches listings)."""
    import gcsfs

    fs = gcsfs.GCSFileSystem()
    fs.invalidate_cache()
    return sorted(f"gs://{path}" for path in fs.find(url))
