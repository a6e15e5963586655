"""The issue #23 fidelity table: every e2e golden family (tests/golden/e2e_*, written by the references' own code)
through our code, model x (token ids, pixels, image features, text features, logits) x max error.

    PYTHONPATH=. python benchmarks/golden_e2e_table.py [--out FILE]

Model-only columns feed the reference's pixels and token ids (relative: max abs error / the reference's max abs);
end-to-end columns read the JPEG files and caption strings through `Embedder` (max abs error of L2-normalised
embeddings; pixels: max and mean abs in normalised units). Builtin CLIP text towers read the HF CLIP tokenizer that
open_clip's push_to_hf_hub saves beside them (tests/golden/clip_tokenizer). transformers' CLIP gets two rows: against
its default CLIPImageProcessor (torchvision) and CLIPImageProcessorPil. Runs a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import golden_e2e as g  # noqa: E402


def measure(name: str, tmp: Path) -> list[tuple[str, dict]]:
    """One row per reference preprocessing: transformers' CLIP has two (its default CLIPImageProcessor, torchvision
    on tensors, and CLIPImageProcessorPil)."""
    from medclip.inference.embedder import Embedder

    model, path = g.load(name, tmp)
    out = {f"model-only {k}": v for k, v in g.model_only(name, model).items()}
    out["model-only text (saved mask)"] = g.model_only(name, model, g.text_mask(name, model))[
        "text_features"]
    if path.suffix == ".pt":
        import shutil

        folder = tmp / (name + "_converted")
        model.save_pretrained(folder)
        for part in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copyfile(path.parent / part, folder / part)
        path = folder
    data = g.io(name)
    embedder = Embedder(path, batch_size=4)
    pixels = embedder.preprocess(g.image_files())
    images = embedder.embed_pixels(pixels)
    text = embedder.embed_texts(g.captions())
    out["token ids equal"] = g.token_ids_match(name, *g.tokenize(embedder, g.captions()))
    out["e2e text embeds"] = float(np.abs(text - g.l2n(data["text_features"])).max())
    rows = []
    for suffix, pil in (("", ""), (", CLIPImageProcessorPil", "_pil")):
        if "pixel_values" + pil not in data:
            continue
        row = dict(out)
        diff = np.abs(pixels.transpose(0, 3, 1, 2) - data["pixel_values" + pil])
        row["e2e pixels max"], row["e2e pixels mean"] = float(diff.max()), float(diff.mean())
        reference = g.l2n(data["image_features" + pil])
        row["e2e image embeds"] = float(np.abs(images - reference).max())
        logits = float(np.exp(data["logit_scale"])) * images @ text.T
        reference_logits = (data["logits_per_image"] if not pil else
                            float(np.exp(data["logit_scale"])) * reference @ g.l2n(data["text_features"]).T)
        row["e2e logits"] = g.rel(logits, reference_logits)
        rows.append((name.removeprefix("e2e_") + suffix, row))
    return rows


COLUMNS = ["model-only image_features", "model-only text_features", "model-only text (saved mask)",
           "model-only logits", "token ids equal", "e2e pixels max", "e2e pixels mean", "e2e image embeds",
           "e2e text embeds", "e2e logits"]


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return f"{value:.1e}" if value < 0.01 else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here (default: stdout)")
    parser.add_argument("families", nargs="*", default=g.FAMILIES)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.families:
            for label, result in measure(name, Path(tmp)):
                rows.append("| " + " | ".join([label] + [fmt(result.get(c)) for c in COLUMNS]) + " |")
                print(rows[-1], flush=True)
    table = "\n".join(["| family | " + " | ".join(COLUMNS) + " |", "|" + " --- |" * (len(COLUMNS) + 1), *rows])
    if args.out:
        args.out.write_text(table + "\n")
    else:
        print(table)


if __name__ == "__main__":
    main()
