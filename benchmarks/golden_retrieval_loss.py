"""What a user loses in retrieval from our image/text preprocessing: one e2e golden fixture model on the 500 ROCO
pairs in ../shared/roco-sample, embedded by the reference (open_clip, or transformers for e2e_hf_clip, in .venv-ref)
and by us (`Embedder`).

    .venv-ref/bin/python benchmarks/golden_retrieval_loss.py reference --out /tmp/ref.npz   # open_clip side
    PYTHONPATH=. .venv/bin/python benchmarks/golden_retrieval_loss.py ours --reference /tmp/ref.npz

The model is random (tiny), so its R@K is near chance: the figures that say what is lost are the per-item
agreement (cosine of our embedding with the reference's) and how often our top-K neighbours are the reference's,
besides R@K of each side and of the mixed ways (our images against the reference's texts and back).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import golden_e2e as g  # noqa: E402

ROCO = Path(__file__).resolve().parents[2] / "shared" / "roco-sample" / "data" / "test" / "radiology"
DEFAULT_ROCO = Path("/work/shared/roco-sample/data/test/radiology")
FAMILY = "e2e_timm_vit_none_mlp"  # BiomedCLIP's family: timm ViT trunk + BERT text, MLP heads, context 77


def pairs(root: Path) -> tuple[list[str], list[str]]:
    captions = dict(line.split("\t", 1) for line in (root / "captions.txt").read_text().splitlines() if "\t" in line)
    ids = sorted(i for i in captions if (root / "images" / f"{i}.jpg").is_file())
    return [str(root / "images" / f"{i}.jpg") for i in ids], [captions[i].strip() for i in ids]


def reference_hf_clip(files: list[str], captions: list[str], family: str) -> tuple[np.ndarray, np.ndarray]:
    """transformers' CLIPModel with its saved CLIPProcessor (the default image processor: torchvision's)."""
    import torch
    import transformers
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        folder = g.model_path(family, Path(tmp))
        model = transformers.CLIPModel.from_pretrained(str(folder)).eval()
        processor = transformers.AutoProcessor.from_pretrained(str(folder))
    images, texts = [], []
    with torch.no_grad():
        for start in range(0, len(files), 50):
            inputs = processor(text=captions[start:start + 50], images=[Image.open(f) for f in files[start:start + 50]],
                               padding=True, truncation=True, return_tensors="pt")
            out = model(**inputs)
            images.append(out.image_embeds.numpy())
            texts.append(out.text_embeds.numpy())
    return np.concatenate(images), np.concatenate(texts)


def reference(root: Path, out: Path, family: str) -> None:
    import open_clip
    import torch
    from PIL import Image

    files, captions = pairs(root)
    if family == "e2e_hf_clip":
        image_embeds, text_embeds = reference_hf_clip(files, captions, family)
        np.savez(out, image_embeds=image_embeds, text_embeds=text_embeds, files=np.array([Path(f).name for f in files]))
        print(f"reference: {len(files)} pairs -> {out}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = g.model_path(family, Path(tmp))
        for part in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
            shutil.copyfile(g.minilm() / part, folder / part)
        sys.path.insert(0, str(g.GOLDEN))
        import make_golden as mg
        kwargs = g.meta(family)["config"]["vision_cfg"].get("timm_model_kwargs") or {}
        config = json.loads((folder / "open_clip_config.json").read_text())
        config["model_cfg"]["vision_cfg"].pop("timm_model_kwargs", None)  # open_clip 3.3.0 has no such key
        (folder / "open_clip_config.json").write_text(json.dumps(config))
        with mg.timm_kwargs_patch(config["model_cfg"]["vision_cfg"]["timm_model_name"], kwargs):
            model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(folder))
        tokenizer = open_clip.get_tokenizer("local-dir:" + str(folder))
    model.eval()
    images, texts = [], []
    with torch.no_grad():
        for start in range(0, len(files), 50):
            batch = torch.stack([preprocess(Image.open(f)) for f in files[start:start + 50]])
            images.append(model.encode_image(batch, normalize=True).numpy())
            texts.append(model.encode_text(tokenizer(captions[start:start + 50]), normalize=True).numpy())
    np.savez(out, image_embeds=np.concatenate(images), text_embeds=np.concatenate(texts),
             files=np.array([Path(f).name for f in files]))
    print(f"reference: {len(files)} pairs -> {out}")


def ours(root: Path, reference_file: Path, family: str) -> None:
    from medclip.evaluation.retrieval import retrieval_metrics
    from medclip.inference.embedder import Embedder

    files, captions = pairs(root)
    ref = np.load(reference_file)
    assert list(ref["files"]) == [Path(f).name for f in files], "the reference embedded other files"
    with tempfile.TemporaryDirectory() as tmp:
        embedder = Embedder(g.model_path(family, Path(tmp)), batch_size=50)
        image_embeds, kept, skipped = embedder.embed_image_files(files, progress=False)
        assert not skipped and len(kept) == len(files), skipped
        text_embeds = embedder.embed_texts(captions)
    ref_images, ref_texts = ref["image_embeds"], ref["text_embeds"]
    print(f"{family} on {len(files)} ROCO pairs")
    for what, a, b in (("image", image_embeds, ref_images), ("text", text_embeds, ref_texts)):
        cos = np.sum(a * b, axis=1)
        print(f"  {what} embeddings: cosine ours vs reference min {cos.min():.4f} mean {cos.mean():.4f}; "
              f"max abs {np.abs(a - b).max():.4f}")
    for k in (1, 5, 10):
        for what, (q_ours, d_ours, q_ref, d_ref) in {
                "i2t": (image_embeds, text_embeds, ref_images, ref_texts),
                "t2i": (text_embeds, image_embeds, ref_texts, ref_images)}.items():
            top_ours = np.argsort(-(q_ours @ d_ours.T), axis=1)[:, :k]
            top_ref = np.argsort(-(q_ref @ d_ref.T), axis=1)[:, :k]
            overlap = np.mean([len(set(x) & set(y)) / k for x, y in zip(top_ours, top_ref)])
            print(f"  {what} top-{k} neighbours shared with the reference: {overlap:.3f}")
    for name, (i, t) in {"reference": (ref_images, ref_texts), "ours": (image_embeds, text_embeds),
                         "our images x reference texts": (image_embeds, ref_texts),
                         "reference images x our texts": (ref_images, text_embeds)}.items():
        result = retrieval_metrics(i, t)
        print(f"  R@1/5/10 {name}: " + ", ".join(
            f"{d} " + "/".join(f"{100 * result[f'{d}_R@{k}']:.1f}" for k in (1, 5, 10)) for d in ("i2t", "t2i")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("side", choices=["reference", "ours"])
    parser.add_argument("--roco", type=Path, default=ROCO if ROCO.is_dir() else DEFAULT_ROCO)
    parser.add_argument("--out", type=Path, default=Path("golden_retrieval_reference.npz"))
    parser.add_argument("--reference", type=Path, default=Path("golden_retrieval_reference.npz"))
    parser.add_argument("--family", default=FAMILY)
    args = parser.parse_args()
    if not (args.roco / "captions.txt").is_file():
        parser.error(f"no ROCO sample at {args.roco}")
    if args.side == "reference":
        reference(args.roco, args.out, args.family)
    else:
        ours(args.roco, args.reference, args.family)


if __name__ == "__main__":
    main()
