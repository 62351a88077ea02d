"""Everything a run reads and writes in its workdir, in one place: the names of its files and how each is read and
written. The training loop, ``resume``, ``metrics_log`` and ``report`` decide what to write; this module only knows
where and how.

    config.json           the run record (settings, ``lr_schedule_steps``, ``extended``); one run per workdir
    metrics.jsonl         one JSON row per logging step and evaluation
    tb/                   TensorBoard event files (written by ``metrics_log.MetricsLog``)
    checkpoints/<step>/   orbax: ``default/`` the train state, ``progress/`` the run's progress at that step (JSON)
    damaged_checkpoints/  unreadable checkpoints moved aside (kept, never deleted)
    results.json          the summary written when a launch ends
    label.txt, eval_sleep_n.json   written by the launchers (a sweep's row label; scores at other N)
    log_window.json       runs written before checkpoints carried their progress: read, never written

The progress item holds what a run resumed at that step needs, besides the train state, to log and report as if
it had never stopped (``metrics_log.RunProgress``). It is saved in the same orbax checkpoint as the state, so the
two are committed together (orbax renames the step folder only once every item of every process is written) and
pruned together (``keep_checkpoints``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import orbax.checkpoint as ocp

CONFIG = "config.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tb"
CHECKPOINTS = "checkpoints"
DAMAGED = "damaged_checkpoints"
RESULTS = "results.json"
LABEL_FILE = "label.txt"
EVAL_SLEEP_N_FILE = "eval_sleep_n.json"
EVAL_SLEEP_TOL_FILE = "eval_sleep_tol.json"  # --eval_sleep_tol: adaptive depth per tolerance
LEGACY_LOG_WINDOW = "log_window.json"

# The train state keeps orbax's name for a single item, so checkpoints written before the progress item existed
# (state only, in "default/") restore the same way, and so does any reader that asks for just the state.
STATE_ITEM = "default"
PROGRESS_ITEM = "progress"


def check_workdir(workdir: str | os.PathLike) -> Path:
    """Creates the workdir and proves it writable before any work starts."""
    path = Path(workdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        # One probe per process: every process of a multi-host run checks the same (shared) workdir at once.
        probe = path / f".write_test.{socket.gethostname()}.{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"workdir {str(path)!r} is not writable: {e}") from None
    return path


def write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)  # readers never see half a file


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


# --- config.json and results.json

def read_run_record(workdir: str | os.PathLike) -> dict | None:
    return _read_json(Path(workdir) / CONFIG)


def write_run_record(workdir: str | os.PathLike, record: dict) -> None:
    write_json(Path(workdir) / CONFIG, record)


def read_results(workdir: str | os.PathLike) -> dict | None:
    return _read_json(Path(workdir) / RESULTS)


def write_results(workdir: str | os.PathLike, results: dict) -> None:
    write_json(Path(workdir) / RESULTS, results)


# --- metrics.jsonl

def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a ``metrics.jsonl``. A last line cut short (a run killed mid-write, or a writer still
    appending) is skipped; a damaged line anywhere else raises."""
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


def keep_metrics(workdir: str | os.PathLike, keep) -> None:
    """Rewrites ``metrics.jsonl`` with only the rows for which ``keep(row)`` holds (a resumed run drops the rows
    its interrupted launch wrote after the checkpoint it resumes from). Atomic, like every rewrite here: a launch
    stopped at any moment (SIGKILL, or a launcher's SIGTERM before its first step) leaves the old file or the new."""
    path = Path(workdir) / METRICS
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in read_metrics(path) if keep(r)))
    os.replace(tmp, path)


def append_metrics(workdir: str | os.PathLike, row: dict) -> None:
    with (Path(workdir) / METRICS).open("a") as f:
        f.write(json.dumps(row) + "\n")


# --- label.txt, and what a report reads of a finished run

def run_label(run_dir: str | os.PathLike, sleep_n: int) -> str:
    path = Path(run_dir) / LABEL_FILE
    return path.read_text().strip() if path.exists() else f"N = {sleep_n}"


def read_run_summary(run_dir: str | os.PathLike) -> dict:
    """A finished run as the reports see it: {"dir", "results" (results.json), "evals" (the eval rows of
    metrics.jsonl), "label"}."""
    run_dir = Path(run_dir)
    results = json.loads((run_dir / RESULTS).read_text())
    evals = [r for r in read_metrics(run_dir / METRICS) if r["kind"] == "eval"]
    return {"dir": str(run_dir), "results": results, "evals": evals, "label": run_label(run_dir, results["sleep_n"])}


def read_eval_sleep_n(run_dir: str | os.PathLike) -> dict | None:
    return _read_json(Path(run_dir) / EVAL_SLEEP_N_FILE)


# --- checkpoints/

def open_checkpoints(workdir: str | os.PathLike, keep: int | None = None) -> ocp.CheckpointManager:
    """The orbax manager of the run's checkpoints; it keeps the newest ``keep`` (None: all)."""
    return ocp.CheckpointManager((Path(workdir) / CHECKPOINTS).absolute(), item_names=(STATE_ITEM, PROGRESS_ITEM),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state, progress: dict, force: bool = False) -> None:
    """The train state and the run's progress at ``step``, one orbax checkpoint (asynchronous: see
    ``manager.wait_until_finished``)."""
    manager.save(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state),
                                                  PROGRESS_ITEM: ocp.args.JsonSave(progress)}), force=force)


def restore_checkpoint(manager: ocp.CheckpointManager, step: int, target, with_progress: bool = True):
    """(state, progress) of checkpoint ``step``, the state laid out like ``target`` (ShapeDtypeStructs with
    shardings). progress is None when the checkpoint has no progress item (written before checkpoints carried
    it: see ``read_legacy_progress``) or ``with_progress`` is False. Storage errors propagate."""
    has_progress = with_progress and (Path(manager.directory) / str(step) / PROGRESS_ITEM).exists()
    items = {STATE_ITEM: ocp.args.StandardRestore(target)}
    if has_progress:
        items[PROGRESS_ITEM] = ocp.args.JsonRestore()
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    return restored[STATE_ITEM], (restored[PROGRESS_ITEM] if has_progress else None)


def read_legacy_progress(workdir: str | os.PathLike, step: int) -> dict | None:
    """The progress at ``step`` of a run written before checkpoints carried it: its entry in ``log_window.json``
    (the same fields), or None if there is none."""
    try:
        return json.loads((Path(workdir) / LEGACY_LOG_WINDOW).read_text()).get(str(step))
    except (OSError, json.JSONDecodeError):
        return None


def move_damaged(workdir: str | os.PathLike, step: int) -> Path:
    """Moves checkpoint ``step`` to ``damaged_checkpoints/<step>`` (``<step>.2``, ... if taken); returns where."""
    workdir = Path(workdir)
    dest = workdir / DAMAGED / str(step)
    for i in range(2, 1000):
        if not dest.exists():
            break
        dest = dest.with_name(f"{step}.{i}")
    dest.parent.mkdir(exist_ok=True)
    shutil.move(str(workdir / CHECKPOINTS / str(step)), str(dest))
    return dest
