"""Runs that survive a cluster: what the run record (``config.json``: one run per workdir, extensions) allows,
restoring the newest readable checkpoint, and preemption notices (SIGTERM) - the pieces ``train`` uses to stop and
resume. (Where each file lives and how it is written: ``sleepjax/rundir.py``.)

- SIGTERM (how pods and spot nodes announce preemption): ``train`` saves a checkpoint at the next step boundary,
  flushes its logs and raises ``Preempted`` (a SystemExit with code ``PREEMPTED_EXIT_CODE`` = 75, EX_TEMPFAIL: run
  the same command again). Several processes stop at the step JAX's preemption sync point names, all the same one.
- An unreadable newest checkpoint: one line naming the step and the reason, the checkpoint moved to
  ``damaged_checkpoints/`` (kept), and the run resumes from the newest one that restores.
- A larger ``steps`` than the workdir's run extends it; the learning-rate schedule keeps the length of the run's
  first ``steps`` (``lr_schedule_steps`` in config.json) and the added steps train at its final rate. Any other
  changed setting is refused, naming it.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils

from sleepjax import rundir
from sleepjax.config import ModelConfig
from sleepjax.train_config import TrainConfig

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure; run the same command again to resume


class Preempted(SystemExit):
    """Raised by ``train`` once the checkpoint at ``step`` is saved after a preemption notice. A SystemExit, so
    uncaught it ends the process with ``PREEMPTED_EXIT_CODE`` and no traceback."""

    def __init__(self, step: int, checkpoints: Path):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step = step
        self.message = (f"preempted: saved the checkpoint at step {step} in {checkpoints}; exit code "
                        f"{PREEMPTED_EXIT_CODE}: run the same command again to resume")

    def __str__(self):
        return self.message


_COMPARED = ("task", "task_options", "model", "train")


def run_description(task, model_cfg: ModelConfig, cfg: TrainConfig) -> dict:
    """What config.json records of a run's settings (not the mesh: a run may resume on another)."""
    return {"task": task.name, "task_options": getattr(task, "options", {}), "model": dataclasses.asdict(model_cfg),
            "train": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("mesh",)}}


def with_defaults(saved: dict | None) -> dict | None:
    """A config.json written before a ModelConfig/TrainConfig field existed: that field at its default (what the
    run used), so such runs still resume."""
    if saved is None:
        return None
    model = json.loads(json.dumps(dataclasses.asdict(ModelConfig())))
    train = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(TrainConfig()))).items() if k != "mesh"}
    return {**saved, "model": {**model, **saved.get("model", {})}, "train": {**train, **saved.get("train", {})}}


def check_same_run(workdir: Path, saved: dict | None, description: dict, has_checkpoint: bool) -> None:
    """A workdir holds one run: resuming with other settings would silently mix two experiments. Only ``steps``
    may change, and only grow (extending the run)."""
    if saved is None:
        return
    new = json.loads(json.dumps(description))
    # steps grows to extend a run; epochs is how many steps it has when a run counts them
    diff = sorted(k for k in _diff_keys({k: saved.get(k) for k in _COMPARED}, new)
                  if k not in ("train.steps", "train.epochs"))
    if diff:
        raise ValueError(f"workdir {str(workdir)!r} holds a run with other settings ({', '.join(diff)}); use a "
                         f"fresh --workdir or the same settings to resume (only the step count may grow, to extend it: steps, or epochs)")
    if has_checkpoint and new["train"]["steps"] < saved["train"]["steps"]:
        raise ValueError(f"workdir {str(workdir)!r} holds a run of {saved['train']['steps']} steps (train.steps) "
                         f"and steps={new['train']['steps']} would shorten it; steps can only grow (to extend the "
                         f"run) - use a fresh --workdir for a shorter run")


def resolve_run_record(saved: dict | None, description: dict, start: int) -> dict:
    """config.json for this run: a fresh record when nothing was restored, else the saved one, extended when
    ``steps`` grew (the schedule keeps the length it had: ``lr_schedule_steps``)."""
    steps = description["train"]["steps"]
    if saved is None or start == 0:
        return {**description, "lr_schedule_steps": steps, "extended": []}
    record = {**saved, **description, "lr_schedule_steps": saved.get("lr_schedule_steps", saved["train"]["steps"]),
              "extended": list(saved.get("extended", []))}
    if steps > saved["train"]["steps"]:
        record["extended"].append({"from_steps": saved["train"]["steps"], "to_steps": steps, "at_step": start})
    return record


def sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _on_every_process(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    return bool(multihost_utils.process_allgather(jnp.asarray(ok, jnp.int32)).all())


class _RestoreAftermath:
    """A failed orbax restore leaves TensorStore reads in flight; as each completes it reports into the event loop
    orbax has already closed, and Python prints a traceback ("Event loop is closed") per read, hundreds for one
    damaged checkpoint. Once installed (for the rest of the process: stragglers can come late), this drops exactly
    those, and asyncio's "Future exception was never retrieved" for the same reads, passing everything else on;
    ``settle`` waits until they have stopped arriving."""

    _installed: "_RestoreAftermath | None" = None

    @classmethod
    def install(cls) -> "_RestoreAftermath":
        self = cls._installed = cls._installed or cls()
        if sys.unraisablehook != self._hook:  # first time, or someone (pytest) swapped hooks since
            self._previous, sys.unraisablehook = sys.unraisablehook, self._hook
        logging.getLogger("asyncio").addFilter(self._filter)  # a no-op if already there
        self.last = time.monotonic()
        return self

    def __init__(self):
        self.last = time.monotonic()
        self._previous = sys.unraisablehook

    def _hook(self, unraisable):
        if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
            self.last = time.monotonic()
        else:
            self._previous(unraisable)

    def _filter(self, record):
        if str(record.msg).startswith(("Future exception was never retrieved", "Task was destroyed")):
            self.last = time.monotonic()
            return False
        return True

    def settle(self, quiet_s: float = 1.0, max_wait_s: float = 10.0):
        deadline = time.monotonic() + max_wait_s
        while time.monotonic() - self.last < quiet_s and time.monotonic() < deadline:
            time.sleep(0.05)
            gc.collect()  # collecting orbax's failed futures is what logs "never retrieved"


class UnreadableCheckpoints(RuntimeError):
    """No checkpoint of the workdir restores (each one's step and reason are in the message); none was moved."""


def _root_cause(error: BaseException | None) -> str:
    if error is None:
        return "it failed to restore on another process"
    while error.__cause__ is not None:  # explicit chaining only: the implicit context is often an internal detail
        error = error.__cause__
    text = f"{type(error).__name__}: " + (str(error).strip().splitlines() or [""])[0]
    return text if len(text) <= 300 else text[:297] + "..."


def restore_newest_readable(open_manager, target, workdir: Path, say):
    """(manager, state, progress, step) with the newest checkpoint that restores, or (manager, None, None, 0) if
    there is none; progress as ``rundir.restore_checkpoint`` gives it (None: the checkpoint predates it).

    Each unreadable newer checkpoint gets one line naming its step and the reason and is moved to
    ``workdir/damaged_checkpoints/`` (kept for inspection; left in place it would stop every later resume). If
    checkpoints exist and none restores, nothing is moved and ``UnreadableCheckpoints`` is raised: that is more
    likely a broken filesystem or install than damage to every checkpoint.
    """
    manager, failures, aftermath = open_manager(), [], None
    try:
        for step in sorted(manager.all_steps(), reverse=True):
            restored, error = (None, None), None
            try:
                restored = rundir.restore_checkpoint(manager, step, target)
            except Exception as e:  # orbax / TensorStore raise Exception, ValueError, OSError, ... by the damage
                error = e
            if _on_every_process(error is None):
                break
            aftermath = _RestoreAftermath.install()
            failures.append((step, _root_cause(error)))
            manager.close()  # a failed restore can leave the manager unable to restore the next one: start afresh
            manager = open_manager()
        else:
            step = None
    finally:
        if aftermath:
            aftermath.settle()
    if step is None:
        if failures:
            manager.close()
            raise UnreadableCheckpoints(f"no checkpoint in {workdir / rundir.CHECKPOINTS} restores: " + "; ".join(
                f"step {s}: {reason}" for s, reason in failures) + ". Repair them, or move checkpoints/ away to "
                "train from step 0")
        return manager, None, None, 0
    if failures:
        for bad, reason in failures:
            if jax.process_index() == 0:
                dest = rundir.move_damaged(workdir, bad)
                say(f"checkpoint at step {bad} is unreadable ({reason}); moved it to {dest}; resuming from step "
                    f"{step}")
        sync_processes("sleepjax_moved_damaged_checkpoints")
        manager.close()
        manager = open_manager()
    return (manager, *restored, step)


def progress_at(workdir: Path, step: int, progress: dict | None) -> dict | None:
    """The run's progress at the restored ``step``: the checkpoint's own, or for a checkpoint written before
    checkpoints carried it, its entry in the old ``log_window.json``. Without either the run is refused: resumed
    there, it would log rows and report timing unlike the run that never stopped."""
    if step == 0 or progress is not None:
        return progress
    legacy = rundir.read_legacy_progress(workdir, step)
    if legacy is None:
        raise ValueError(
            f"the checkpoint at step {step} in {workdir / rundir.CHECKPOINTS} was written before checkpoints "
            f"carried the run's progress, and {workdir / rundir.LEGACY_LOG_WINDOW} (where such runs kept it) has no "
            f"entry for step {step}: resumed there, its logs would differ from the run's. Put that log_window.json "
            f"back, or train in a fresh workdir")
    return legacy


class PreemptionNotice:
    """Has a preemption notice (SIGTERM) come? One process: a signal handler sets a flag, read at step boundaries.
    Several processes: JAX's preemption sync manager catches SIGTERM on any of them and names one step at which
    ``reached`` is True on every process (``multihost_utils.reached_preemption_sync_point``); it must be asked at
    every step by all of them."""

    def __init__(self):
        self.multi = jax.process_count() > 1
        self.received = False
        self._previous = None
        if not self.multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.received = True

    def reached(self, step: int) -> bool:
        if self.multi is None:
            return False
        if not self.multi:
            return self.received
        try:
            return multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError as e:  # jax_enable_preemption_service is off: SIGTERM keeps its default (exit)
            print(f"warning: {e}; SIGTERM will stop the run without a checkpoint", flush=True)
            self.multi = None
            return False

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _diff_keys(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for key in set(a) | set(b):
            yield from _diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")
    elif a != b:
        yield prefix.rstrip(".")
