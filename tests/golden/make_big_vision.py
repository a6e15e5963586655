"""Golden fixture: a tiny SigLIP through big_vision's OWN two_towers model code, saved as big_vision saves `.npz`.

    git clone https://github.com/google-research/big_vision /tmp/big_vision   # (commit in meta.json)
    .venv/bin/python tests/golden/make_big_vision.py --big_vision /tmp/big_vision

Runs `big_vision.models.proj.image_text.two_towers.Model` (its ViT with the MAP head, its text transformer) with
flax.linen from our venv, initialised at random, every parameter then moved off its initial value (LayerNorm
scales of 1 and zero biases would hide a swapped or dropped parameter), with a non-default temperature t and bias
b. Writes into tests/golden/big_vision_siglip/:

    siglip_tiny.npz        the checkpoint as big_vision writes .npz files: np.savez of
                           utils.tree_flatten_with_names({"params": params}) ('/'-joined keys, params/img/...,
                           params/txt/..., params/t, params/b), python-loop encoder blocks
    siglip_tiny_scan.npz   the same for a model built with scan=True (encoder blocks stacked: encoderblock/...)
    io.npz                 pixel_values (3, 32, 32, 3) NHWC in [-1, 1], input_ids (3, 16) int32 padded with 1
                           (big_vision's SigLIP pad/EOS id), then per checkpoint (prefix `scan_` for the second):
                           image_embeds, text_embeds (normalised by the model), logits (images, texts) =
                           zimg @ ztxt.T * exp(t) + b, as big_vision's SigLIP trainer forms them
    meta.json              big_vision's commit, the model config, what was stubbed

big_vision/utils.py imports `ml_collections` (config dicts) at module level, which the two_towers model does not
use and our venv lacks: it is stubbed with an empty module, nothing else.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "big_vision_siglip"
SEED = 0
TEMPERATURE, BIAS = 7.3, -4.7  # exp(t) and b: neither SigLIP's init (10, -10) nor 1 / 0
TOWER = dict(variant="mu", depth=2)  # width 32, mlp 128, 2 heads (big_vision's "mu" variant), two blocks


def model_config(scan: bool) -> dict:
    return dict(
        image_model="vit", text_model="proj.image_text.text_transformer",
        image=dict(**TOWER, patch_size=(8, 8), pool_type="map", posemb="learn", scan=scan),
        text=dict(**TOWER, vocab_size=99, pool_type="last", scan=scan),
        out_dim=(None, 32),  # SigLIP: no image head; the text head projects to the image width
        temperature_init=TEMPERATURE, bias_init=BIAS)


def inputs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SEED)
    pixels = rng.uniform(-1, 1, size=(3, 32, 32, 3)).astype(np.float32)
    ids = np.ones((3, 16), np.int32)  # padded with 1 to the full length, as big_vision's SigLIP tokenises
    for row, length in enumerate((16, 9, 4)):
        ids[row, :length] = rng.integers(2, 99, length)
    return pixels, ids


def build(scan: bool, seed: int, pixels: np.ndarray, ids: np.ndarray):
    import jax
    import jax.numpy as jnp

    from big_vision.models.proj.image_text import two_towers

    cfg = model_config(scan)
    model = two_towers.Model(**{k: v for k, v in cfg.items()})
    params = model.init(jax.random.PRNGKey(seed), jnp.asarray(pixels), jnp.asarray(ids))["params"]
    rng = np.random.default_rng(seed + 1)

    def move(path, leaf):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if name in ("t", "b"):  # set by temperature_init / bias_init
            return leaf
        leaf = np.asarray(leaf)
        return jnp.asarray(leaf + rng.normal(0, 0.1, leaf.shape).astype(leaf.dtype))

    params = jax.tree_util.tree_map_with_path(move, params)
    zimg, ztxt, out = model.apply({"params": params}, jnp.asarray(pixels), jnp.asarray(ids))
    logits = jnp.dot(zimg, ztxt.T) * out["t"] + out["b"]
    return params, {"image_embeds": np.asarray(zimg), "text_embeds": np.asarray(ztxt), "logits": np.asarray(logits)}


def save_npz(params, path: Path) -> None:
    """big_vision's .npz checkpoint writer (its old utils.save_checkpoint, PaliGemma's npsave): np.savez of the
    flattened tree's '/'-joined names."""
    import big_vision.utils as u

    names_and_vals, _ = u.tree_flatten_with_names({"params": params})
    with open(path, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in names_and_vals})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big_vision", required=True, help="a checkout of google-research/big_vision")
    args = parser.parse_args()
    root = Path(args.big_vision).resolve()
    sys.path.insert(0, str(root))
    sys.modules.setdefault("ml_collections", types.ModuleType("ml_collections"))  # see the docstring
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown (not a git checkout)"
    import flax

    OUT.mkdir(exist_ok=True)
    pixels, ids = inputs()
    io = {"pixel_values": pixels, "input_ids": ids}
    for scan, name, prefix in ((False, "siglip_tiny.npz", ""), (True, "siglip_tiny_scan.npz", "scan_")):
        params, outputs = build(scan, SEED + (7 if scan else 0), pixels, ids)
        save_npz(params, OUT / name)
        io.update({prefix + k: v for k, v in outputs.items()})
    np.savez(OUT / "io.npz", **io)
    meta = {"big_vision_commit": commit, "flax": flax.__version__, "seed": SEED,
            "model": "big_vision.models.proj.image_text.two_towers.Model",
            "configs": {"siglip_tiny.npz": model_config(False), "siglip_tiny_scan.npz": model_config(True)},
            "stubbed_imports": {"ml_collections": "imported by big_vision/utils.py for config dicts; unused here"},
            "perturbation": "every parameter but t and b + N(0, 0.1) after init"}
    (OUT / "meta.json").write_text(json.dumps(meta, indent=1, default=list) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
