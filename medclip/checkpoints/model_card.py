"""The model card (README.md) written next to an exported model and pushed with it to the Hub."""

from __future__ import annotations

from typing import Any

from medclip.models.hybrid import HybridCLIPConfig

_WARNING = ("**Not for clinical use.** This model is a research artefact for image-text retrieval on radiology "
            "figures from publications. It has not been validated for diagnosis, triage or any clinical decision, "
            "and its outputs must not be used for patient care.")


def _table(metrics: dict[str, float]) -> str:
    rows = ["| metric | value |", "|---|---|"]
    for key, value in metrics.items():
        if isinstance(value, float):
            shown = f"{100 * value:.2f}%" if "R@" in key or "mrr" in key else f"{value:.4g}"
            rows.append(f"| {key} | {shown} |")
    return "\n".join(rows)


def _describe(tower: Any) -> str:
    """A tower's size in words, from whichever fields its config has (transformers or convolutional)."""
    if hasattr(tower, "num_hidden_layers"):
        patch = f", patch {tower.patch_size}" if hasattr(tower, "patch_size") else ""
        return f"{tower.num_hidden_layers} layers, {tower.hidden_size} wide{patch}"
    if hasattr(tower, "layers"):
        return f"stages {list(tower.layers)}, {tower.hidden_size}-d output"
    return f"{tower.hidden_size}-d output"


def render_model_card(config: HybridCLIPConfig, *, training: dict[str, Any] | None = None,
                      eval_metrics: dict[str, float] | None = None, dataset: str = "",
                      base_models: tuple[str, ...] = ()) -> str:
    vision, text = config.vision_config, config.text_config
    pt_class = "CLIPModel" if config.is_clip else "VisionTextDualEncoderModel"
    front = ["---", "library_name: medclip", "license: apache-2.0", "tags:", "- clip", "- medical", "- radiology",
             "- image-text-retrieval", "- jax", "- flax"]
    if base_models:
        front += ["base_model:", *[f"- {m}" for m in base_models]]
    front.append("---")
    lines = [
        *front, "", "# medclip dual encoder", "", _WARNING, "",
        "## Model", "",
        f"A {vision.model_type} vision tower ({_describe(vision)}, {vision.image_size} px) and a "
        f"{text.model_type} text tower ({_describe(text)}), projected to {config.projection_dim} "
        "dimensions and trained contrastively with medclip (JAX/Flax NNX).", "",
        "Load it with medclip or, in PyTorch, with transformers:", "",
        "```python", "from medclip import FlaxHybridCLIP", "model = FlaxHybridCLIP.from_pretrained(\"<this repo>\")",
        "", f"from transformers import {pt_class}", f"model = {pt_class}.from_pretrained(\"<this repo>\")", "```", "",
        "medclip takes pixel values as NHWC; transformers takes NCHW.", "",
        "## Intended use", "",
        "Research on retrieval of radiology images by text and of captions by image, and zero-shot labelling "
        "experiments, on data like ROCO (figures from PubMed Central articles). Captions in such data describe "
        "figures as published, not patients as examined; the model inherits their biases and gaps.", "",
    ]
    if dataset or training:
        lines += ["## Training", ""]
        if dataset:
            lines += [f"Data: {dataset}", ""]
        for key, value in (training or {}).items():
            lines.append(f"- {key}: {value}")
        lines.append("")
    if eval_metrics:
        lines += ["## Evaluation", "", "Retrieval on the validation split (recall@K in both directions; identical "
                  "captions count as correct for each of their images):", "", _table(eval_metrics), ""]
    lines += ["## Limitations", "", _WARNING, ""]
    return "\n".join(lines)
