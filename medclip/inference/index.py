"""An embedding index: image embeddings with their files (and captions), tied to the model that made them.

Stored as one `.npz`, a local file or an object in a bucket (medclip.storage). Searching with another model's
embeddings would return confident nonsense, so the index records the model's fingerprint and embedding size and
refuses a mismatch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import io

import numpy as np

from medclip import storage


class IndexMismatchError(ValueError):
    pass


@dataclasses.dataclass
class EmbeddingIndex:
    embeddings: np.ndarray  # (n, dim) float32, L2-normalised
    paths: list[str]
    captions: list[str]  # "" where unknown
    model_fingerprint: str
    model_dir: str = ""

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def __len__(self) -> int:
        return len(self.paths)

    def save(self, path: str | os.PathLike) -> storage.AnyPath:
        path = storage.as_path(path)
        meta = {"model_fingerprint": self.model_fingerprint, "model_dir": _relative(self.model_dir, path.parent),
                "dim": self.dim}
        stored = [_relative(p, path.parent) for p in self.paths]  # the index moves with its images
        buffer = io.BytesIO()  # a file object keeps numpy from appending ".npz"
        np.savez(buffer, embeddings=self.embeddings.astype(np.float32), paths=np.array(stored, dtype=str),
                 captions=np.array(self.captions, dtype=str), meta=np.array(json.dumps(meta)))
        storage.write_bytes(path, buffer.getvalue())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EmbeddingIndex":
        path = storage.as_path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no embedding index at {path}; build one with `medclip embed`")
        with path.open("rb") as f:
            if f.read(4) != b"PK\x03\x04":  # an .npz is a zip archive; numpy's own message talks of pickles
                raise ValueError(f"{path} is not a medclip embedding index (an .npz file from `medclip embed`)")
        try:
            with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                index = cls(embeddings=data["embeddings"],
                            paths=[_resolve(p, path.parent) for p in data["paths"].tolist()],
                            captions=data["captions"].tolist(), model_fingerprint=meta["model_fingerprint"],
                            model_dir=_resolve(meta.get("model_dir", ""), path.parent))
        except KeyError as error:
            raise ValueError(f"{path} is not a medclip embedding index (no {error} in it)") from None
        except (ValueError, OSError) as error:
            raise ValueError(f"{path} is not a medclip embedding index ({str(error).splitlines()[0]})") from None
        if not len(index):
            raise ValueError(f"{path} holds no images; rebuild it with `medclip embed` on a folder of images")
        return index

    def check_model(self, fingerprint: str, dim: int) -> None:
        if dim != self.dim:
            raise IndexMismatchError(f"the index holds {self.dim}-d embeddings but the model makes {dim}-d ones; "
                                     "rebuild the index with this model (`medclip embed`)")
        if fingerprint != self.model_fingerprint:
            raise IndexMismatchError(f"the index was built by another model (fingerprint {self.model_fingerprint}, "
                                     f"this model {fingerprint}); rebuild it with `medclip embed`")

    def search(self, query_embeds: np.ndarray, k: int = 5,
               exclude: list[str] | None = None) -> list[list[tuple[int, float]]]:
        """Top-k (index, cosine similarity) per query row, best first. Works for text and image queries (the
        embeddings share one space); `exclude` leaves those image files out (an image query's own file)."""
        scores = np.atleast_2d(query_embeds) @ self.embeddings.T  # (queries, n)
        if exclude:
            left_out = {os.path.realpath(p) for p in exclude}
            mask = np.array([os.path.realpath(p) in left_out for p in self.paths], bool)
            scores = np.where(mask[None, :], -np.inf, scores)
            k = min(k, int((~mask).sum()))
        k = min(k, len(self))
        if k <= 0:
            return [[] for _ in scores]
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        results = []
        for row, candidates in zip(scores, top):
            order = candidates[np.argsort(-row[candidates], kind="stable")]
            results.append([(int(i), float(row[i])) for i in order])
        return results


def _relative(path: str, folder: storage.AnyPath) -> str:
    """Relative to the index's folder when both are local; a URL (image, model or index in a bucket) stays whole."""
    if not path or storage.is_url(path):
        return path
    if not isinstance(folder, Path):  # a local file named by an index in a bucket
        return str(Path(path).absolute())
    return os.path.relpath(Path(path).absolute(), folder.absolute())


def _resolve(path: str, folder: storage.AnyPath) -> str:
    if not path or os.path.isabs(path) or storage.is_url(path):
        return path
    if not isinstance(folder, Path):
        return storage.join(folder, path)
    return os.path.normpath(folder.absolute() / path)
