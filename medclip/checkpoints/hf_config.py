"""Reading a Hugging Face `config.json`: the JSON itself, and the `model_type` old checkpoints leave out.

The bottom of the checkpoint loaders: every format that meets a Hugging Face tower (our own layout, an OpenCLIP
model's HF text tower, PMC-CLIP's PubMedBERT, a pretrained tower folder) reads its config through here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONFIG_JSON = "config.json"


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_config_json(folder: Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_JSON}")
    return read_json(path)


def infer_model_type(data: dict[str, Any], name: str) -> str:
    """Old checkpoints (SciBERT's, for one) have no `model_type`; transformers then guesses from the
    architecture list or the repo name, and so do we, in the same order of specificity."""
    if data.get("model_type"):
        return data["model_type"]
    hints = " ".join(data.get("architectures") or []).lower() + " " + name.lower()
    for model_type in ("distilbert", "xlm-roberta", "roberta", "bert", "clip"):
        if model_type.replace("-", "") in hints.replace("-", ""):
            return model_type
    raise ValueError(f"{name}: {CONFIG_JSON} has no model_type and none can be inferred from its name or "
                     f"architectures; add \"model_type\" to {CONFIG_JSON}")
