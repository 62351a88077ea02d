"""Run logs a person can follow: a live progress line, ``metrics.jsonl`` and TensorBoard event files, plus the
bookkeeping that keeps them right across restarts (the partial averaging window, throughput without evaluation)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a ``metrics.jsonl``. A last line cut short (a run killed mid-write, or a writer still appending)
    is skipped; a damaged line anywhere else raises."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1 and any(rest.strip() for rest in lines[i + 1:]):
                raise ValueError(f"{path}: line {i + 1} is not JSON: {line[:80]!r}") from None
    return rows


class MetricsLog:
    """Appends rows ``{"step", "kind", ...}`` to ``metrics.jsonl`` and scalars to TensorBoard under ``tb/``.

    On resume from ``resume_step`` the rows of steps after it (written by the run that died) are dropped, so
    the log reads as if the run had never stopped; with ``redo_eval=True`` the evaluation row of ``resume_step``
    is dropped too (the resumed run scores that step again).
    """

    def __init__(self, workdir: str | os.PathLike, resume_step: int = 0, enabled: bool = True,
                 redo_eval: bool = False):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        if not enabled:
            return
        rows = [r for r in read_metrics(self.path)
                if r["step"] < resume_step or (r["step"] == resume_step and not (redo_eval and r["kind"] == "eval"))]
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


class Window:
    """The per-step metrics summed since the last ``metrics.jsonl`` row; a row is their mean.

    A checkpoint that falls inside a window stores the partial sums (``state()``), so a run resumed there writes
    the same rows, to the bit, as one that never stopped (the sums are float64 additions in step order).
    """

    def __init__(self, state: dict | None = None):
        self.sums: dict[str, float] = dict((state or {}).get("sums", {}))
        self.steps: int = int((state or {}).get("steps", 0))

    def add(self, metrics: dict) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.steps += 1

    def take(self) -> dict:
        """The means over the window, which then starts again."""
        means = {k: v / max(self.steps, 1) for k, v in self.sums.items()}
        self.sums, self.steps = {}, 0
        return means

    def state(self) -> dict:
        return {"sums": dict(self.sums), "steps": self.steps}


class WindowStore:
    """``log_window.json`` in the workdir: the partial window at each checkpoint step (see ``Window``)."""

    def __init__(self, workdir: str | os.PathLike):
        self.path = Path(workdir) / "log_window.json"

    def load(self, step: int) -> dict | None:
        try:
            return json.loads(self.path.read_text()).get(str(step))
        except (OSError, json.JSONDecodeError):
            return None

    def save(self, step: int, state: dict, keep_steps) -> None:
        """Records ``state`` for ``step``; forgets steps not in ``keep_steps`` (checkpoints orbax deleted)."""
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            saved = {}
        keep = {str(s) for s in keep_steps} | {str(step)}
        saved = {k: v for k, v in saved.items() if k in keep}
        saved[str(step)] = state
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(saved))
        os.replace(tmp, self.path)


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
