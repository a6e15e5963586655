"""Where a run's time goes: wall and process-CPU seconds per phase (start-up, data loading, tokenization, the locked
towers' caches, model build, the first step's compilation, waiting for batches, the steps, evaluation, checkpoints,
export), recorded by the trainer and written once to metrics.jsonl as a `phases` record.

Phases nest exclusively: entering one pauses the phase around it, so every second is charged to one phase and the
phases never add up to more than the run. CPU seconds are the whole process's (`time.process_time`, every thread):
the input pipeline's decoding threads run beside the step and are charged to whichever phase the main thread is in;
the wall seconds say where the main thread waited. The script takes the origin itself, before its first import of
medclip (whose package imports JAX), and charges everything up to the trainer to "start-up".
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

# In the order a run meets them; every record holds all of them (0 where a run has no such phase).
PHASES = ("start-up", "model build", "data loading", "tokenization", "locked-tower cache", "first step",
          "data wait", "step", "evaluation", "checkpoint save", "export")
OTHER = "other"  # what no phase claimed: the table shows it so that the rows add up to the whole run


class PhaseTimer:
    """Accumulates (wall, CPU) seconds per phase. `started`: the run's (perf_counter, process_time) origin, e.g.
    taken by the script before its imports; default now. Not thread-safe: the main thread's phases."""

    def __init__(self, started: tuple[float, float] | None = None):
        self.started = started if started is not None else _now()
        self.seconds: dict[str, list[float]] = {name: [0.0, 0.0] for name in PHASES}
        self._stack: list[str] = []
        self._mark = self.started

    def _charge(self, name: str | None) -> None:
        now = _now()
        if name is not None:
            totals = self.seconds.setdefault(name, [0.0, 0.0])
            totals[0] += now[0] - self._mark[0]
            totals[1] += now[1] - self._mark[1]
        self._mark = now

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Charges the block's time to `name`, less the time of phases entered inside it."""
        self._charge(self._stack[-1] if self._stack else None)
        self._stack.append(name)
        try:
            yield
        finally:
            self._charge(self._stack.pop())

    def since_last(self, name: str) -> None:
        """Charges to `name` the time since the last phase ended (or since `started`): a phase the caller could not
        wrap, such as the script's imports before the trainer existed."""
        self._charge(name)

    def record(self) -> dict:
        """{"phases": {name: {"wall_s", "cpu_s"}}, "phases_total": {"wall_s", "cpu_s"}} since `started`."""
        now = _now()
        phases = {name: {"wall_s": wall, "cpu_s": cpu} for name, (wall, cpu) in self.seconds.items()}
        total = {"wall_s": now[0] - self.started[0], "cpu_s": now[1] - self.started[1]}
        return {"phases": phases, "phases_total": total}


def rows(record: dict) -> list[tuple[str, float, float]]:
    """(phase, wall s, CPU s) of a `PhaseTimer.record()`, with the unclaimed rest of the run as "other"."""
    phases, total = record["phases"], record["phases_total"]
    found = [(name, seconds["wall_s"], seconds["cpu_s"]) for name, seconds in phases.items()]
    return [*found, (OTHER, total["wall_s"] - sum(r[1] for r in found), total["cpu_s"] - sum(r[2] for r in found))]


def table(record: dict) -> str:
    """A `PhaseTimer.record()` as a short text table: each phase's wall and CPU seconds and share of the run."""
    total, listed = record["phases_total"], rows(record)
    width = max(len(name) for name, *_ in listed)

    def share(part: float, whole: float) -> str:
        return f"{100 * part / whole:5.1f}%" if whole > 0 else "    -"

    lines = [f"{'phase':<{width}}  {'wall s':>8} {'share':>6}  {'CPU s':>8} {'share':>6}"]
    for name, wall, cpu in [*listed, ("total", total["wall_s"], total["cpu_s"])]:
        lines.append(f"{name:<{width}}  {wall:8.1f} {share(wall, total['wall_s'])}  {cpu:8.1f} "
                     f"{share(cpu, total['cpu_s'])}")
    return "\n".join(lines)


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()
