"""Resolving Hub ids or local folders, and pushing models, through huggingface_hub (its cache, its
offline mode, its token handling: we never read, print or log the token ourselves).

The Hub is asked once per name: huggingface_hub retries a failed connection five times with back-off (about
half a minute) before it falls back to its cache, which on a machine without network (a cluster node) turns
every mistyped path into a long wait and a network traceback. One request without retries tells us whether
the Hub answers; if it does not, only the cache is used."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

from medclip.storage import is_url

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "flax_model.msgpack",
                "open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # OpenCLIP hub repos
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "vocab.json", "merges.txt", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model")
# Released checkpoints that their own code names by a short name: name -> (repo id, repo type, file).
# PMC-CLIP's `--resume "PMC_CLIP:beta"` is its checkpoint.pt in the axiong/pmc_oa_beta dataset repository.
NAMED_CHECKPOINTS = {"PMC_CLIP:beta": ("axiong/pmc_oa_beta", "dataset", "checkpoint.pt")}
HUB_TIMEOUT_S = 10.0
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class ModelNotFoundError(FileNotFoundError):
    """A model name that is neither a local path nor a reachable or cached Hub repository."""


def _looks_local(name: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else, or a name whose first part is a local file or folder
    (`outputs/nodemo` beside an `outputs/` folder), is meant as a path."""
    if name.startswith((".", "/", "~")) or not _HUB_ID.match(name):
        return True
    return "/" in name and Path(name.split("/", 1)[0]).exists()


def cache_dir() -> str:
    import huggingface_hub.constants as constants

    return str(constants.HF_HUB_CACHE)


def _offline() -> bool:
    import huggingface_hub.constants as constants

    return bool(constants.HF_HUB_OFFLINE)


def _not_reachable(name: str, reason: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"{name!r} is not a local folder, and the Hub could not be reached ({reason}) nor has it been cached in "
        f"{cache_dir()} (set HF_HOME or HF_HUB_CACHE if your cache is elsewhere; HF_HUB_OFFLINE=1 skips the "
        f"network). Download it where there is network (`hf download {name}`) or pass a local folder.")


def _repo_files(repo_id: str, repo_type: str | None = None, revision: str | None = None) -> list[str] | str:
    """The repository's file names, from one request without retries; or, when the Hub cannot be reached (offline
    mode, no network), a short reason as a string. A repository the Hub says does not exist raises."""
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    if _offline():
        return "HF_HUB_OFFLINE is set"
    try:
        info = huggingface_hub.HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision,
                                                 timeout=HUB_TIMEOUT_S)
    except OfflineModeIsEnabled:
        return "HF_HUB_OFFLINE is set"
    except GatedRepoError:
        raise ModelNotFoundError(f"Hub repo {repo_id!r} is gated: accept its terms on the Hub and log in "
                                 "(`hf auth login`), or pass a local folder") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{repo_id!r} is neither a local folder nor a Hub repo (or it is private: "
                                 "`hf auth login`)") from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"Hub repo {repo_id!r} has no revision {revision!r}") from None
    except (HfHubHTTPError, httpx2.HTTPError, OSError) as error:
        return f"{error.__class__.__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}".rstrip(": ")
    return [s.rfilename for s in (info.siblings or [])]


# Hub names resolved in this process: the up-front name check, the model, its tokenizer and the tools each resolve
# the same name, and each resolution online is a request to the Hub.
_RESOLVED: dict[tuple[str, str | None, str], Path] = {}


def resolve_model_dir(name_or_path: str | os.PathLike, *, revision: str | None = None) -> Path:
    """A local model folder as is, or a Hub repo id downloaded (config, one weights file, tokenizer) into
    the huggingface_hub cache, once per process. Offline (HF_HUB_OFFLINE=1 or no network) the cache is used.
    open_clip's `hf-hub:ORG/NAME` spelling is accepted."""
    name_or_path = str(name_or_path).removeprefix("hf-hub:")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if name in NAMED_CHECKPOINTS:
        return resolve_named_checkpoint(name).parent
    if path.exists():
        raise NotADirectoryError(f"{path} is a file; pass the model folder (with config.json) or a Hub id")
    if _looks_local(name):
        raise ModelNotFoundError(f"model folder {path} does not exist (under {Path.cwd()})")
    key = (name, revision, cache_dir())
    if key not in _RESOLVED:
        _RESOLVED[key] = _download_model(name, revision)
    return _RESOLVED[key]


def _download_model(name: str, revision: str | None) -> Path:
    import huggingface_hub

    files = _repo_files(name, revision=revision)
    if isinstance(files, str):
        try:
            return Path(huggingface_hub.snapshot_download(name, revision=revision, local_files_only=True))
        except Exception:
            raise _not_reachable(name, files) from None
    weights = next((w for w in WEIGHT_FILES if w in files), None)
    if weights is None:
        raise ModelNotFoundError(f"Hub repo {name!r} has none of {WEIGHT_FILES}")
    patterns = ["config.json", "open_clip_config.json", *TOKENIZER_FILES, weights]
    if weights.endswith(".index.json"):
        stem = weights.split(".")[0]
        patterns.append(f"{stem}-*")
    return Path(huggingface_hub.snapshot_download(name, revision=revision, allow_patterns=patterns))


def resolve_named_checkpoint(name: str) -> Path:
    """The local file of a released checkpoint named as its own code names it (`PMC_CLIP:beta`), downloaded into
    (or, offline, found in) the huggingface_hub cache."""
    key = (name, None, cache_dir())
    if key not in _RESOLVED:
        _RESOLVED[key] = _download_named_checkpoint(name)
    return _RESOLVED[key]


def _download_named_checkpoint(name: str) -> Path:
    import huggingface_hub

    repo_id, repo_type, filename = NAMED_CHECKPOINTS[name]
    files = _repo_files(repo_id, repo_type=repo_type)
    if isinstance(files, list):
        if filename not in files:
            raise ModelNotFoundError(f"{name}: the Hub {repo_type} repo {repo_id!r} has no {filename}")
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, repo_type=repo_type))
    try:
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, repo_type=repo_type, local_files_only=True))
    except Exception:
        raise ModelNotFoundError(
            f"{name} ({filename} of the Hub {repo_type} repo {repo_id}) could not be downloaded ({files}) nor "
            f"found in the cache {cache_dir()} (set HF_HOME or HF_HUB_CACHE if your cache is elsewhere). Download "
            f"it where there is network: `hf download {repo_id} {filename} --repo-type {repo_type}`.") from None


def check_model_names(*names: str | os.PathLike | None) -> None:
    """Resolves each model or tokenizer name (local, cached or downloaded) before anything heavy starts, so that a
    wrong name or an unreachable Hub is said in seconds rather than after the training stack has loaded."""
    for name in names:
        if name is None or is_url(name) or Path(str(name).removeprefix("hf-hub:")).expanduser().exists():
            continue  # a bucket URL is checked by medclip.storage (training.locations), not the Hub
        resolve_model_name(name) if str(name) in NAMED_CHECKPOINTS else resolve_model_dir(name)


def resolve_model_name(name_or_path: str | os.PathLike) -> str:
    """A named checkpoint (`PMC_CLIP:beta`) as its local file; any other name unchanged."""
    name = str(name_or_path)
    return str(resolve_named_checkpoint(name)) if name in NAMED_CHECKPOINTS else name


def push_model_to_hub(model: Any, repo_id: str, *, tokenizer: Any = None, private: bool = False,
                      commit_message: str = "Upload medclip model", model_card: str | None = None,
                      extra_files: dict[str, str | os.PathLike] | None = None) -> str:
    """Saves the model (and tokenizer, model card, extra files) to a temporary folder and uploads it.

    The token comes from HF_TOKEN or `hf auth login`, resolved by huggingface_hub itself.
    """
    import shutil

    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, tokenizer=tokenizer)
        if model_card is not None:
            Path(tmp, "README.md").write_text(model_card)
        for name, source in (extra_files or {}).items():
            shutil.copy(source, Path(tmp, name))
        info = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)
    return str(getattr(info, "commit_url", info))
