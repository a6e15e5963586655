"""Resolving Hub ids or local folders, and pushing models, through huggingface_hub (its cache, its
offline mode, its token handling: we never read, print or log the token ourselves)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "flax_model.msgpack",
                "open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # OpenCLIP hub repos
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "vocab.json", "merges.txt", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model")


def _looks_local(name: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else is meant as a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def resolve_model_dir(name_or_path: str | os.PathLike, *, revision: str | None = None) -> Path:
    """A local model folder as is, or a Hub repo id downloaded (config, one weights file, tokenizer) into
    the huggingface_hub cache. Offline (HF_HUB_OFFLINE=1 or no network) the cache is used. open_clip's
    `hf-hub:ORG/NAME` spelling is accepted."""
    name_or_path = str(name_or_path).removeprefix("hf-hub:")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists():
        raise NotADirectoryError(f"{path} is a file; pass the model folder (with config.json) or a Hub id")
    if _looks_local(name):
        raise FileNotFoundError(f"model folder {path} does not exist")
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        files = set(huggingface_hub.list_repo_files(name, revision=revision))
    except (OfflineModeIsEnabled, HfHubHTTPError, OSError) as online_error:
        try:
            return Path(huggingface_hub.snapshot_download(name, revision=revision, local_files_only=True))
        except Exception:
            raise FileNotFoundError(
                f"{name!r} is not a local folder, and the Hub could not be reached ({online_error.__class__.__name__})"
                " nor has it been cached. Download it where there is network (`hf download "
                f"{name}`) or pass a local folder.") from None
    weights = next((w for w in WEIGHT_FILES if w in files), None)
    if weights is None:
        raise FileNotFoundError(f"Hub repo {name!r} has none of {WEIGHT_FILES}")
    patterns = ["config.json", "open_clip_config.json", *TOKENIZER_FILES, weights]
    if weights.endswith(".index.json"):
        stem = weights.split(".")[0]
        patterns.append(f"{stem}-*")
    return Path(huggingface_hub.snapshot_download(name, revision=revision, allow_patterns=patterns))


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
