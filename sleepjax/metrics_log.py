"""Run logs a person can follow: a live progress line, ``metrics.jsonl`` and TensorBoard event files, plus the
bookkeeping that keeps them right across restarts (``RunProgress``: the running mean of the current logging window,
throughput without evaluation, the sleep counts of the whole run), which every checkpoint carries."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from sleepjax import rundir
from sleepjax.rundir import read_metrics  # noqa: F401 (re-exported: the tests and tools read logs from here)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsLog:
    """Appends rows ``{"step", "kind", ...}`` to ``metrics.jsonl`` and scalars to TensorBoard under ``tb/``.

    On resume from ``resume_step`` the rows of steps after it (written by the run that died) are dropped, so
    the log reads as if the run had never stopped; with ``redo_eval=True`` the evaluation row of ``resume_step``
    is dropped too (the resumed run scores that step again).
    """

    def __init__(self, workdir: str | os.PathLike, resume_step: int = 0, enabled: bool = True,
                 redo_eval: bool = False):
        self.enabled = enabled
        self.workdir = Path(workdir)
        if not enabled:
            return
        rundir.keep_metrics(workdir, lambda r: r["step"] < resume_step or (
            r["step"] == resume_step and not (redo_eval and r["kind"] == "eval")))
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(self.workdir / rundir.TENSORBOARD),
                                purge_step=resume_step + 1 if resume_step else None)
        self._live = sys.stdout.isatty()

    def write(self, step: int, kind: str, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "kind": kind, **{k: _plain(v) for k, v in metrics.items()}}
        rundir.append_metrics(self.workdir, row)
        for key, value in row.items():
            if key not in ("step", "kind") and isinstance(value, (int, float)):
                self.tb.add_scalar(f"{kind}/{key}", value, step)

    def line(self, text: str, final: bool = False) -> None:
        """A progress line: rewritten in place on a terminal, one line per call otherwise."""
        if not self.enabled:
            return
        if self._live and not final:
            sys.stdout.write("\r\033[K" + text)
        else:
            sys.stdout.write(("\r\033[K" if self._live else "") + text + "\n")
        sys.stdout.flush()

    def flush(self) -> None:
        if self.enabled:
            self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.tb.close()


def _plain(value):
    try:
        return float(value) if not isinstance(value, (int, str, bool)) and value is not None else value
    except TypeError:
        return str(value)


class RunningMean:
    """The per-step metrics summed since the last ``metrics.jsonl`` row; a row is their mean.

    A checkpoint that falls inside a logging window stores the partial sums (``state()``, in ``RunProgress``), so
    a run resumed there writes the same rows, to the bit, as one that never stopped (the sums are float64
    additions in step order).
    """

    def __init__(self, state: dict | None = None):
        self.sums: dict[str, float] = dict((state or {}).get("sums", {}))
        self.steps: int = int((state or {}).get("steps", 0))

    def add(self, metrics: dict) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.steps += 1

    def take(self) -> dict:
        """The means since the last call, which then start again."""
        means = {k: v / max(self.steps, 1) for k, v in self.sums.items()}
        self.sums, self.steps = {}, 0
        return means

    def state(self) -> dict:
        return {"sums": dict(self.sums), "steps": self.steps}


class Throughput:
    """Steps/s over the training steps since the last report, counting only the seconds the steps themselves took
    (fetching the batch, the step, the loss sync): evaluation and checkpoint saves in between are not step time.

    The caller times each step and passes its seconds to ``add``; a process's first step (compilation) is left out.
    """

    def __init__(self, total_seconds: float = 0.0, total_steps: int = 0):
        """``total_*``: what earlier launches of the same run measured (a resumed run's timing continues)."""
        self.seconds, self.steps = 0.0, 0
        self.total_seconds, self.total_steps = float(total_seconds), int(total_steps)

    def add(self, seconds: float) -> None:
        self.seconds += seconds
        self.steps += 1
        self.total_seconds += seconds
        self.total_steps += 1

    def take(self) -> float | None:
        """Steps/s over the steps added since the last call (None if none were)."""
        rate = self.steps / max(self.seconds, 1e-9) if self.steps else None
        self.seconds, self.steps = 0.0, 0
        return rate

    def seconds_per_step(self) -> float | None:
        return self.total_seconds / self.total_steps if self.total_steps else None


class RunProgress:
    """What a run has done besides its train state, carried by every checkpoint (``rundir.save_checkpoint``) so
    that a launch resumed there logs and reports as if the run had never stopped:

    - ``mean``: the running mean of the current logging window (``RunningMean``);
    - ``rate`` and ``wall_before``: the step time and wall clock of the launches before this one, so results.json
      covers the whole run, not only the last launch (restarting a finished run must not replace its timing by
      the few seconds of restoring it);
    - ``sleep``: the example-windows that should have slept and did, summed over the whole run.

    ``saved``: ``state()`` as a checkpoint stored it (None: a fresh run). The format is that of the entries of
    the ``log_window.json`` of older runs, which are read the same way.
    """

    def __init__(self, saved: dict | None, sleep_keys=()):
        saved = saved or {}
        timing = saved.get("timing", {})
        self.mean = RunningMean(saved)
        self.rate = Throughput(timing.get("step_seconds", 0.0), timing.get("steps_timed", 0))
        self.wall_before = float(timing.get("wall_clock_s", 0.0))
        self.sleep = {k: 0.0 for k in sleep_keys} | saved.get("sleep", {})

    def add(self, metrics: dict) -> None:
        """One training step's metrics."""
        self.mean.add(metrics)
        for key in self.sleep:
            self.sleep[key] += float(metrics[key])

    def state(self, wall_clock_s: float) -> dict:
        """JSON for the checkpoint; ``wall_clock_s``: the whole run's wall clock so far."""
        return {**self.mean.state(), "sleep": dict(self.sleep), "timing": {
            "step_seconds": self.rate.total_seconds, "steps_timed": self.rate.total_steps,
            "wall_clock_s": wall_clock_s}}
