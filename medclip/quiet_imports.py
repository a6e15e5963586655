"""TensorFlow prints start-up lines on every command (absl's "All log messages before absl::InitializeLog()" and
oneDNN's notice, each twice) from C++ while it loads, where TF_CPP_MIN_LOG_LEVEL does not reach them. The scripts
install this hook: TensorFlow's first import runs with file descriptor 2 captured, and every captured line except
those known start-up lines is written back, so a real warning or error still shows.

The same first import runs without Keras: TensorFlow imports it eagerly when it is installed (to register Keras's
optimizers for SavedModels; Keras then imports matplotlib and scikit-learn), about a third of TensorFlow's import
time, though medclip uses no Keras. `tf.keras` still loads on first use, after TensorFlow's import."""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import tempfile
from collections.abc import Iterator

START_UP_LINES = ("All log messages before absl::InitializeLog() is called",
                  "oneDNN custom operations are on")


@contextlib.contextmanager
def filtered_stderr(drop: tuple[str, ...] = START_UP_LINES) -> Iterator[None]:
    """Captures what C++ and Python write to stderr (fd 2) inside the block; replays it without lines containing
    any of `drop`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                    if not any(d in line for d in drop)]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


class _NoKeras(importlib.abc.MetaPathFinder):
    """While installed, Keras is found but fails to import (ImportError, which TensorFlow's eager load catches): the
    real spec, so that TensorFlow's look-ups of where Keras lives still work; only running it is refused."""

    def find_spec(self, fullname, path, target=None):
        if fullname.partition(".")[0] not in ("keras", "tf_keras"):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec

        def refuse(module):
            raise ImportError(f"{fullname} is not imported while TensorFlow starts (medclip.quiet_imports)")

        spec.loader.exec_module = refuse  # this spec's own loader object: nothing shared is changed
        return spec


class _QuietFirstImport(importlib.abc.MetaPathFinder):
    def __init__(self, name: str):
        self.name = name

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once; find_spec below must not find this finder again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            no_keras = _NoKeras()
            sys.meta_path.insert(0, no_keras)
            try:
                with filtered_stderr():
                    load(module)
            finally:
                sys.meta_path.remove(no_keras)

        spec.loader.exec_module = exec_module
        return spec


def quiet_tensorflow_start_up() -> None:
    """Installs the hook (once), unless TensorFlow is loaded already."""
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietFirstImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietFirstImport("tensorflow"))
