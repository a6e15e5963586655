"""Where the time of the `roco-small` preset's run goes, and what the existing cuts save: the trainer's phase table
(medclip.training.phase_times, the `phases` record of each run's metrics.jsonl) for a few variants of the run,
alternated in one session, plus the input pipeline alone with and without reduced-scale JPEG decoding.

    python benchmarks/run_phases.py                       # the default variants once each, then the decode A/B
    python benchmarks/run_phases.py --repeats 2 --decode_repeats 3
    python benchmarks/run_phases.py --variant "mine=--eval_epochs 2 --compilation_cache_dir {cache}" --no_decode
    python benchmarks/run_phases.py --show OUTPUT_DIR     # the phase table of any finished run

The run is benchmarks/quality.py's 'ours' (`quality.ours_argv`: tiny CLIP ViT 4x256 at 128 px + locked
all-MiniLM-L6-v2, text cached, batch 64) with the preset's choices (`--lr_schedule cosine --warmup_steps 20 --loss
concept`), trained on --train_data. Variants (run in this order, `--repeats` times round):
- cold cache: evaluating on --test_data every epoch (the preset's default with a validation split), with an empty
  persistent compilation cache (`{empty_cache}`: the `{cache}` folder emptied first; not a fresh folder, because
  JAX's cache keys hold the folder's path: a copied cache misses);
- warm cache: the same with `{cache}`, which the cold run filled;
- eval at the end: the same, warm, with `--eval_epochs` = the number of epochs (one evaluation, after the last step);
- no eval: quality.py's own form (no validation set), warm.
`{test}` in a variant's flags stands for the test pairs' JSON lines file. Reported per run: the whole process's
wall and CPU seconds (measured here, as quality.py does) and each phase's CPU seconds and share. On a machine shared
with other work, read the CPU seconds and shares: wall time moves with the load.

Decode A/B (`--decode_repeats`, alternating): the training input pipeline alone (medclip.data.pipeline, the run's
128 px random resized crop, batch 64) over as many batches as the run trains, in a fresh process per
measurement, with libjpeg's reduced-scale decoding (medclip.data.images) as shipped and with it turned off (every
JPEG decoded at full size, `_JPEG_SCALES = (1,)`); then the same for the evaluation pipeline over --test_data.
Results go to benchmarks/results/phases-<date>.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (benchmarks/quality.py: the run's arguments and data split)

PRESET = "--lr_schedule cosine --warmup_steps 20 --loss concept"
EVAL = "--do_eval --validation_file {test} --per_device_eval_batch_size 64"


def default_variants(epochs: int) -> list[tuple[str, str]]:
    return [("cold cache, eval every epoch", f"{PRESET} {EVAL} --compilation_cache_dir {{empty_cache}}"),
            ("warm cache, eval every epoch", f"{PRESET} {EVAL} --compilation_cache_dir {{cache}}"),
            ("warm cache, eval at the end only", f"{PRESET} {EVAL} --eval_epochs {epochs} --compilation_cache_dir {{cache}}"),
            ("warm cache, no eval (quality.py's form)", f"{PRESET} --compilation_cache_dir {{cache}}")]


def read_phases(output_dir: Path) -> dict:
    """The `phases` record of a run's metrics.jsonl."""
    path = Path(output_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    found = [r for r in records if "phases" in r]
    if not found:
        raise ValueError(f"{path} has no phases record (a run from before the phase table, or one that failed)")
    return found[-1]


# -- one training run ---------------------------------------------------------------------------------------------
def run_variant(args, train: Path, test: Path, flags: str, work: Path, index: int, cache: Path) -> dict:
    if "{empty_cache}" in flags:  # the same folder emptied: JAX's cache keys hold its path, so no fresh folder
        shutil.rmtree(cache, ignore_errors=True)
    flags = flags.format(test=test, cache=cache, empty_cache=cache)
    out, log = work / f"run{index}", work / f"run{index}.log"
    argv = quality.ours_argv(args, train, out, flags)
    start, cpu_start = time.perf_counter(), quality.children_cpu_s()
    with log.open("w") as f:
        code = subprocess.call(argv, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall, cpu = time.perf_counter() - start, quality.children_cpu_s() - cpu_start
    if code != 0:
        raise RuntimeError(f"run_hybrid_clip.py exited {code}; see {log}")
    record = read_phases(out)
    return {"flags": flags, "process_wall_s": wall, "process_cpu_s": cpu, "phases": record["phases"],
            "phases_total": record["phases_total"]}


# -- the input pipeline alone (python run_phases.py --decode_worker MODE SPLIT FOLDER BATCHES) ----------------------
def finished_run(output_dir: Path) -> dict:
    """A run made elsewhere (`--add_run`): its process figures are its own phase record's totals (from the
    script's first line: the interpreter's own start-up, a fraction of a second, is not in them)."""
    record = read_phases(output_dir)
    return {"flags": f"(finished run {output_dir})", "process_wall_s": record["phases_total"]["wall_s"],
            "process_cpu_s": record["phases_total"]["cpu_s"], "phases": record["phases"],
            "phases_total": record["phases_total"]}


def decode_worker(mode: str, split: str, folder: Path, batches: int, size: int, batch_size: int) -> None:
    from medclip.data import images
    from medclip.data.pipeline import Captions, ImageSettings, make_eval_dataset, make_train_dataset

    if mode == "full":
        images._JPEG_SCALES = (1,)  # every JPEG decoded at full size, then cropped and resized
    items = quality.load_pairs(folder)
    n = len(items)
    captions = Captions(input_ids=np.zeros((n, 8), np.int32), attention_mask=np.ones((n, 8), np.int32),
                        first=np.arange(n, dtype=np.int64), count=np.ones(n, np.int64))
    image = ImageSettings(size=size)
    start, cpu_start = time.perf_counter(), time.process_time()
    pairs = 0
    if split == "train":
        feed = make_train_dataset(items, captions, global_batch_size=batch_size, seed=0, image=image,
                                  process_index=0, process_count=1)
        for _ in range(batches):
            pairs += len(next(feed)["pixel_values"])
    else:
        for batch in make_eval_dataset(items, captions, global_batch_size=batch_size, image=image,
                                       process_index=0, process_count=1):
            pairs += int(batch["mask"].sum())
    print(json.dumps({"pairs": pairs, "wall_s": time.perf_counter() - start,
                      "cpu_s": time.process_time() - cpu_start}))


def startup_worker(mode: str) -> None:
    """The script's start-up up to the trainer (its imports with the TensorFlow hook): CPU seconds of the process.
    mode "keras": the hook's Keras skip turned off (TensorFlow's eager import of Keras, as before it)."""
    from medclip import quiet_imports

    if mode == "keras":
        quiet_imports._NoKeras.find_spec = lambda self, fullname, path, target=None: None
    quiet_imports.quiet_tensorflow_start_up()
    import medclip.training.trainer  # noqa: F401  (what run_hybrid_clip.py imports before the trainer starts)

    print(json.dumps({"cpu_s": time.process_time(), "keras": "keras" in sys.modules}))


def run_startup(mode: str) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--startup_worker", mode]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise RuntimeError(f"start-up worker {mode} exited {done.returncode}: {done.stderr[-2000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - start}


def run_decode(mode: str, split: str, folder: Path, batches: int, args) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--decode_worker", mode, split, str(folder), str(batches),
            "--batch_size", str(args.batch_size)]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise RuntimeError(f"decode worker {mode} {split} exited {done.returncode}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- report -------------------------------------------------------------------------------------------------------
def markdown(args, runs: list[tuple[str, dict]], decode: dict[tuple[str, str], list[dict]],
             startup: dict[str, list[dict]]) -> str:
    from medclip.training.phase_times import rows as phase_rows

    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [f"# Where the preset's run spends its time, {when}", "",
             f"`python benchmarks/run_phases.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}`", "",
             f"Train {args.train_data}, test {args.test_data}; {args.epochs} epochs, batch {args.batch_size}, seed "
             f"{args.seed}; preset flags `{PRESET}`. Process wall / CPU: the whole `run_hybrid_clip.py` process "
             "(CPU: user + system, all threads). Phase CPU: `time.process_time()` (all threads: the input "
             "pipeline's decoding runs beside the step and is charged to the phase the main thread is in).", ""]
    if runs:
        names = [row[0] for row in phase_rows(runs[0][1])]
        lines += ["## Runs (in the order run)", "",
                  "| run | process wall s | process CPU s | " + " | ".join(f"{n} CPU s (share)" for n in names) + " |",
                  "|---" * (len(names) + 3) + "|"]
        for label, result in runs:
            total = result["phases_total"]["cpu_s"]
            cells = [f"{cpu:.1f} ({100 * cpu / total:.0f}%)" for _, _, cpu in phase_rows(result)]
            lines.append(f"| {label} | {result['process_wall_s']:.0f} | {result['process_cpu_s']:.0f} | "
                         + " | ".join(cells) + " |")
        lines += ["", "Wall seconds per phase (these move with the machine's load):", "",
                  "| run | " + " | ".join(names) + " | total |", "|---" * (len(names) + 2) + "|"]
        for label, result in runs:
            lines.append(f"| {label} | " + " | ".join(f"{wall:.1f}" for _, wall, _ in phase_rows(result))
                         + f" | {result['phases_total']['wall_s']:.1f} |")
        lines.append("")
    if decode:
        lines += ["## The input pipeline alone: reduced-scale JPEG decoding on / off", "",
                  "| pipeline | decoding | pairs | CPU s (each measurement) | pairs per CPU-second | wall s |",
                  "|---|---|---|---|---|---|"]
        for (split, mode), rows in decode.items():
            cpu, wall = [r["cpu_s"] for r in rows], [r["wall_s"] for r in rows]
            lines.append(f"| {split} | {'reduced scale (shipped)' if mode == 'reduced' else 'full size'} | "
                         f"{rows[0]['pairs']} | {', '.join(f'{c:.1f}' for c in cpu)} | "
                         f"{np.mean([r['pairs'] / r['cpu_s'] for r in rows]):.0f} | "
                         f"{', '.join(f'{w:.1f}' for w in wall)} |")
        lines.append("")
    if startup:
        lines += ["## Start-up to the trainer: TensorFlow's first import with / without Keras", "",
                  "| TensorFlow's first import | CPU s (each process, alternated) | mean | Keras loaded |",
                  "|---|---|---|---|"]
        for mode, rows in startup.items():
            cpu = [r["cpu_s"] for r in rows]
            lines.append(f"| {'skips Keras (shipped)' if mode == 'hook' else 'imports Keras (before)'} | "
                         f"{', '.join(f'{c:.2f}' for c in cpu)} | {np.mean(cpu):.2f} | {rows[0]['keras']} |")
        lines.append("")
    lines += ["Per run:", "", "```", json.dumps(runs, indent=1), "```", ""]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decode_worker", nargs=4, metavar=("MODE", "SPLIT", "FOLDER", "BATCHES"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--startup_worker", help=argparse.SUPPRESS)
    parser.add_argument("--startup_repeats", type=int, default=3, help="rounds of the start-up A/B (0: none)")
    parser.add_argument("--show", metavar="OUTPUT_DIR", help="print the phase table of a finished run and exit")
    parser.add_argument("--train_data", default=str(ROOT.parent / "shared" / "roco-train"))
    parser.add_argument("--test_data", default=str(ROOT.parent / "shared" / "roco-sample"))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", action="append", default=None, metavar="LABEL=FLAGS",
                        help="a run of the variants (repeat; default: the four above); {test}, {cache}, "
                             "{empty_cache} as described")
    parser.add_argument("--add_run", action="append", default=[], metavar="LABEL=OUTPUT_DIR",
                        help="a finished run to list first (its process figures from its phase record)")
    parser.add_argument("--cache_dir", default=None, help="the folder {cache} stands for (default: in --work_dir)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the variants, alternated")
    parser.add_argument("--decode_repeats", type=int, default=2, help="rounds of the decode A/B")
    parser.add_argument("--no_decode", action="store_true", help="skip the decode A/B")
    parser.add_argument("--no_runs", action="store_true", help="only the decode A/B")
    parser.add_argument("--work_dir", default=None, help="default: a new folder under /tmp")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/phases-<date>.md")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.decode_worker:
        mode, split, folder, batches = args.decode_worker
        decode_worker(mode, split, Path(folder), int(batches), 128, args.batch_size)
        return 0
    if args.startup_worker:
        startup_worker(args.startup_worker)
        return 0
    if args.show:
        from medclip.training.phase_times import table

        try:
            print(table(read_phases(Path(args.show))))
        except (OSError, ValueError) as error:
            print(f"run_phases.py: {error}", file=sys.stderr)
            return 2
        return 0
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="medclip-phases-"))
    train_items, test_items = quality.load_pairs(Path(args.train_data)), quality.load_pairs(Path(args.test_data))
    train, test = quality.write_split(train_items, test_items, work / "split")
    # quality.py's defaults for everything ours_argv reads (text model, learning rate, weight decay)
    qargs = quality.parse_args(["--epochs", str(args.epochs), "--batch_size", str(args.batch_size),
                                "--seed", str(args.seed)])
    variants = ([tuple(v.split("=", 1)) for v in args.variant] if args.variant else default_variants(args.epochs))
    runs: list[tuple[str, dict]] = [(label, finished_run(Path(folder)))
                                    for label, folder in (a.split("=", 1) for a in args.add_run)]
    cache = Path(args.cache_dir) if args.cache_dir else work / "xla-cache"
    index = 0
    for round_ in range(args.repeats if not args.no_runs else 0):
        for label, flags in variants:
            result = run_variant(qargs, train, test, flags, work, index, cache)
            index += 1
            runs.append((f"{label} (round {round_ + 1})", result))
            from medclip.training.phase_times import table

            print(f"{label}, round {round_ + 1}: process wall {result['process_wall_s']:.0f} s, CPU "
                  f"{result['process_cpu_s']:.0f} s\n{table(result)}\n", flush=True)
    decode: dict[tuple[str, str], list[dict]] = {}
    if not args.no_decode:
        batches = (len(train_items) // args.batch_size) * args.epochs
        for _ in range(args.decode_repeats):
            for split, folder in (("train", args.train_data), ("eval", args.test_data)):
                for mode in ("reduced", "full"):
                    result = run_decode(mode, split, Path(folder), batches, args)
                    decode.setdefault((split, mode), []).append(result)
                    print(f"decode {split} {mode}: {json.dumps(result)}", flush=True)
    startup: dict[str, list[dict]] = {}
    for _ in range(args.startup_repeats):
        for mode in ("hook", "keras"):
            result = run_startup(mode)
            startup.setdefault(mode, []).append(result)
            print(f"start-up {mode}: {json.dumps(result)}", flush=True)
    report = markdown(args, runs, decode, startup)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"phases-{datetime.date.today()}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(f"written to {out}; work folder {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
