#!/usr/bin/env bash
# The ROCO recipe. Until the trainer lands this is a short model demo: build a tiny FlaxHybridCLIP,
# save it in transformers' dual-encoder layout, load it back and check the logits agree.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT_DIR:-outputs/demo}
python - "$OUT" <<'PY'
import sys
import jax.numpy as jnp, numpy as np
from flax import nnx
from medclip import FlaxHybridCLIP, HybridCLIPConfig

out = sys.argv[1]
model = FlaxHybridCLIP(HybridCLIPConfig.tiny(), rngs=nnx.Rngs(0))
ids = jnp.array([[2, 5, 6, 7, 3], [2, 8, 9, 3, 0]]); mask = (ids != 0).astype(jnp.int32)
px = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
before = model(ids, px, mask).logits_per_image
model.save_pretrained(out)
after = FlaxHybridCLIP.from_pretrained(out)(ids, px, mask).logits_per_image
print("logits_per_image:", np.asarray(after).round(4).tolist())
assert np.allclose(before, after, atol=1e-6)
print(f"saved to {out} and reloaded with identical logits")
PY
