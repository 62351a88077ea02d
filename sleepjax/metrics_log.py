"""Run logs a person can follow: a live progress line, ``metrics.jsonl`` and TensorBoard event files."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def read_metrics(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    """Appends rows ``{"step", "kind", ...}`` to ``metrics.jsonl`` and scalars to TensorBoard under ``tb/``.

    On resume from ``resume_step`` the rows of steps after it (written by the run that died) are dropped, so
    the log reads as if the run had never stopped.
    """

    def __init__(self, workdir: str | os.PathLike, resume_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        if not enabled:
            return
        rows = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(Path(workdir) / "tb"), purge_step=resume_step + 1 if resume_step else None)
        self._live = sys.stdout.isatty()

    def write(self, step: int, kind: str, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "kind": kind, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
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

    def close(self) -> None:
        if self.enabled:
            self.tb.close()


def _plain(value):
    try:
        return float(value) if not isinstance(value, (int, str, bool)) else value
    except TypeError:
        return str(value)


class Throughput:
    """Steps/s and tokens/s over the steps since the last report (compilation excluded after the first)."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.steps = 0

    def tick(self, steps: int) -> float:
        now = time.perf_counter()
        rate = steps / max(now - self.last, 1e-9)
        self.last = now
        return rate
