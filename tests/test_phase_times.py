"""The phase table: exclusive nesting of phases (with a scripted clock), and a real tiny run through the script that
writes one `phases` record covering every phase."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from medclip.data import synthetic
from medclip.training import phase_times
from medclip.training.phase_times import PHASES, PhaseTimer, table

ROOT = Path(__file__).resolve().parent.parent


def test_nested_phases_are_charged_exclusively_and_the_rest_is_other(monkeypatch):
    ticks = iter([(0.0, 0.0),      # the timer's origin
                  (1.0, 0.5),      # enter "model build": the second before it is nobody's
                  (3.0, 2.0),      # enter "data loading" inside it: model build has 2 s
                  (7.0, 3.0),      # leave data loading: 4 s
                  (8.0, 3.5),      # leave model build: 1 s more
                  (10.0, 5.0),     # start-up charged with everything since the last phase ended
                  (12.0, 6.0)])    # the record
    monkeypatch.setattr(phase_times, "_now", lambda: next(ticks))
    timer = PhaseTimer()
    with timer.phase("model build"):
        with timer.phase("data loading"):
            pass
    timer.since_last("start-up")
    record = timer.record()
    phases = record["phases"]
    assert set(phases) == set(PHASES)
    assert phases["model build"] == {"wall_s": 3.0, "cpu_s": 2.0}
    assert phases["data loading"] == {"wall_s": 4.0, "cpu_s": 1.0}
    assert phases["start-up"] == {"wall_s": 2.0, "cpu_s": 1.5}
    assert phases["step"] == {"wall_s": 0.0, "cpu_s": 0.0}
    assert record["phases_total"] == {"wall_s": 12.0, "cpu_s": 6.0}
    rows = {line.split()[0]: line.split() for line in table(record).splitlines()[1:]}
    assert rows["other"][1:3] == ["3.0", "25.0%"]  # 12 s less the 9 s the phases claimed
    assert rows["total"][1:] == ["12.0", "100.0%", "6.0", "100.0%"]


def test_a_phase_left_by_an_exception_is_still_charged(monkeypatch):
    ticks = iter([(0.0, 0.0), (1.0, 1.0), (4.0, 2.0), (4.0, 2.0)])
    monkeypatch.setattr(phase_times, "_now", lambda: next(ticks))
    timer = PhaseTimer()
    try:
        with timer.phase("evaluation"):
            raise KeyError("x")
    except KeyError:
        pass
    assert timer.record()["phases"]["evaluation"] == {"wall_s": 3.0, "cpu_s": 1.0}


def test_a_tiny_run_writes_one_phases_record_covering_the_run(tmp_path, capsys):
    train_file = synthetic.write_synthetic_dataset(tmp_path / "t", 16, seed=0, image_size=32, name="train")
    valid_file = synthetic.write_synthetic_dataset(tmp_path / "v", 8, seed=1, image_size=32, name="valid")
    out = tmp_path / "out"
    sys.path.insert(0, str(ROOT))
    try:
        import run_hybrid_clip
    finally:
        sys.path.remove(str(ROOT))
    argv = ["--model_preset", "demo", "--image_size", "32", "--train_file", str(train_file), "--validation_file",
            str(valid_file), "--max_seq_length", "16", "--output_dir", str(out), "--do_train", "--do_eval",
            "--num_train_epochs", "2", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
            "--freeze_text", "--no_text_dropout", "--report_to", "none", "--logging_steps", "1",
            "--text_packing_sizes", "0", "--early_stopping_patience", "0"]
    before = time.perf_counter()
    assert run_hybrid_clip.main(argv) == 0
    wall = time.perf_counter() - before
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 4 and summary["text_tower_cached"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in rows if "phases" in r]
    assert len(records) == 1 and records[0]["step"] == 4
    phases, total = records[0]["phases"], records[0]["phases_total"]
    assert list(phases) == list(PHASES)
    assert all(s["wall_s"] >= 0 and s["cpu_s"] >= 0 for s in phases.values())
    assert sum(s["wall_s"] for s in phases.values()) <= total["wall_s"] <= wall
    # Every phase this run went through was charged (it evaluated, saved, exported, cached the text tower).
    assert [name for name, s in phases.items() if s["wall_s"] == 0] == []
