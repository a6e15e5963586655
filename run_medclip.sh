#!/usr/bin/env bash
# The recipes (configs/*.toml) and the embedded demo. Runs under sh, bash or ./run_medclip.sh.
#
#   ./run_medclip.sh                                   embedded demo: synthetic radiology-like pairs, tiny towers,
#                                                      CPU, a few minutes; trains, evaluates, plots, builds an index
#   ./run_medclip.sh ROCO_ROOT [flags...]              the medclip recipe on ROCO (ROCO_ROOT/data/{train,validation})
#   ./run_medclip.sh TRAIN VALIDATION [flags...]       the medclip recipe on JSON lines / CSV files
#                                                      (local paths or bucket URLs: gs://bucket/roco, OUT_DIR=gs://...)
#   ./run_medclip.sh --recipe NAME ROCO_ROOT [flags...]      (or TRAIN VALIDATION) another recipe
#   ./run_medclip.sh --recipe list                     the recipes: name, source, description
#
# Recipe flags come first, so extra flags win, e.g. --dtype float32 (default auto: bf16 on TPU/GPU), --output_dir (default
# outputs/RECIPE-roco, or $OUT_DIR), --push_to_hub --hub_model_id me/medclip-roco.
if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi  # sh is dash on Debian: re-run under bash
set -euo pipefail
cd "$(dirname "$0")"
if [ -z "${PYTHON:-}" ]; then  # the project's venv (make demo / make test create it), else python on PATH
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
USAGE="usage: $0 [--recipe NAME|list] [ROCO_ROOT | TRAIN_FILE VALIDATION_FILE] [run_hybrid_clip.py flags...]"

RECIPE=medclip
if [ "${1:-}" = "--recipe" ]; then
  if [ $# -lt 2 ]; then echo "$USAGE" >&2; exit 2; fi
  RECIPE=$2; shift 2
  if [ "$RECIPE" = list ]; then exec "$PYTHON" run_hybrid_clip.py --recipe list; fi
  if [ $# -eq 0 ]; then echo "$USAGE" >&2; exit 2; fi
fi

if [ $# -eq 0 ]; then
  OUT=${OUT_DIR:-outputs/demo}
  "$PYTHON" run_hybrid_clip.py --output_dir "$OUT" --overwrite_output_dir --model_preset demo \
    --synthetic_train_samples 4096 --synthetic_validation_samples 512 --synthetic_image_size 64 \
    --max_seq_length 32 --do_train --do_eval --num_train_epochs 4 --per_device_train_batch_size 64 \
    --per_device_eval_batch_size 64 --learning_rate 1e-3 --warmup_steps 20 --weight_decay 0.1 \
    --lr_schedule linear --logging_steps 16 --save_steps 0 --seed 42
  "$PYTHON" -m medclip.cli embed "$OUT" --data "$OUT/synthetic/validation/validation.jsonl" --out "$OUT/index.npz"
  "$PYTHON" -m medclip.cli search "Axial CT of the chest showing a large mass in the left upper lobe." \
    --index "$OUT/index.npz" -k 5 --grid "$OUT/retrieval_grid.png"
  "$PYTHON" - "$OUT" <<'PY'
import json, sys
from medclip import FlaxHybridCLIP
out = sys.argv[1]
FlaxHybridCLIP.from_pretrained(out)  # the exported folder loads
rows = [json.loads(l) for l in open(f"{out}/metrics.jsonl") if "eval_loss" in l]
last, n = rows[-1], rows[-1]["eval_examples"]
print(f"\nvalidation retrieval after {len(rows)} epochs on {n} pairs (chance R@10 = {10 / n:.1%}):")
for d in ("i2t", "t2i"):
    print(f"  {d}: R@1 {last[f'eval_{d}_R@1']:.1%}  R@5 {last[f'eval_{d}_R@5']:.1%}  R@10 {last[f'eval_{d}_R@10']:.1%}"
          f"  median rank {last[f'eval_{d}_median_rank']:.0f}")
print(f"model: {out} (FlaxHybridCLIP.from_pretrained), curves: {out}/training_curves.png, "
      f"index: {out}/index.npz, grid: {out}/retrieval_grid.png; next: `make app` (or `source .venv/bin/activate`, then `medclip app`)")
PY
  exit 0
fi

# A bucket URL (gs://, s3://, any scheme://) cannot be tested with [ -d ] / [ -f ] here: it goes through, a file
# when it names a .jsonl/.json/.csv/.tsv object, else a folder, and run_hybrid_clip.py checks that it exists.
is_url() { case "$1" in [A-Za-z]*://*) return 0 ;; *) return 1 ;; esac; }
is_data_file() {
  if is_url "$1"; then case "$1" in *.jsonl | *.json | *.csv | *.tsv) return 0 ;; *) return 1 ;; esac; fi
  [ -f "$1" ]
}
is_data_dir() { if is_url "$1"; then ! is_data_file "$1"; else [ -d "$1" ]; fi; }

if is_data_dir "$1"; then
  DATA=(--data_dir "$1"); shift
elif [ $# -ge 2 ] && is_data_file "$1" && is_data_file "$2"; then
  DATA=(--train_file "$1" --validation_file "$2"); shift 2
else
  echo "$USAGE" >&2
  exit 2
fi
exec "$PYTHON" run_hybrid_clip.py --recipe "$RECIPE" --output_dir "${OUT_DIR:-outputs/$RECIPE-roco}" "${DATA[@]}" "$@"
