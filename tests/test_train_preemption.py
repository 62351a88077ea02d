"""Runs that survive a real cluster, in one process: SIGTERM saves and stops with exit code 75 and the resumed run
is the uninterrupted one to the bit; an unreadable newest checkpoint is moved aside and the one before it
resumes; a larger ``steps`` extends a finished or interrupted run with one learning-rate rule; a finished run
restarted trains nothing; the final step is always checkpointed; throughput leaves evaluation and saves out; runs
written before checkpoints carried their progress (``log_window.json``) still resume, or are refused naming why.

One clean 25-step run (checkpoints every 10, rows every 3, evaluation every 10) is the reference for all of them.
"""

import json
import os
import random
import shutil
import signal
from pathlib import Path

import orbax.checkpoint as ocp
import pytest

import sleepjax.train
from helpers.compare import assert_bitwise_equal
from helpers.runs import checkpoint_params, damage_checkpoint, finished_checkpoints, micro_setup, without_timing
from sleepjax import rundir
from sleepjax.metrics_log import read_metrics
from sleepjax.train import (INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE, Interrupted, Preempted, TrainConfig,
                            UnreadableCheckpoints, train)

STEPS = 25
SETTINGS = dict(steps=STEPS, checkpoint_every=10, log_every=3, eval_every=10)
STALL = 1e6  # fake seconds that each evaluation and each checkpoint save take in the reference run


class SigtermAt:
    """The task, except that building the batch of ``step`` sends this process SIGTERM (the prefetcher builds it
    while the step before trains), so the notice lands at a step boundary near ``step``."""

    def __init__(self, task, step):
        self._task, self._step = task, step

    def __getattr__(self, name):
        return getattr(self._task, name)

    def batch(self, seed, step, batch_size, rows=None, **options):
        if step == self._step:
            os.kill(os.getpid(), signal.SIGTERM)
        return self._task.batch(seed, step, batch_size, rows=rows, **options)


class LauncherStop:
    """A launcher's ``stop`` (experiments/common.py), driven by the test: Ctrl-C "arrives" when the batch of
    ``at_step`` is built; records when train says a step is unsaved and when everything is saved."""

    def __init__(self):
        self.requested, self.calls = None, []

    def unsaved(self):
        self.calls.append("unsaved")

    def saved(self):
        self.calls.append("saved")


class CtrlCAt(SigtermAt):
    def __init__(self, task, step, stop):
        super().__init__(task, step)
        self._stop = stop

    def batch(self, seed, step, batch_size, rows=None, **options):
        if step == self._step:
            self._stop.requested = signal.SIGINT
        return self._task.batch(seed, step, batch_size, rows=rows, **options)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The clean run, on a fake clock: each clock read is one second later, and every evaluation and checkpoint
    save adds STALL seconds (how the throughput test sees what is counted as step time)."""
    workdir = tmp_path_factory.mktemp("reference")
    task, model_cfg, cfg = micro_setup(**SETTINGS)
    clock = {"t": 0.0}

    def now():
        clock["t"] += 1.0
        return clock["t"]

    def stalling(fn):
        def wrapped(*args, **kwargs):
            clock["t"] += STALL
            return fn(*args, **kwargs)
        return wrapped

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sleepjax.train, "_now", now)
        mp.setattr(sleepjax.train, "evaluate", stalling(sleepjax.train.evaluate))
        mp.setattr(ocp.CheckpointManager, "save", stalling(ocp.CheckpointManager.save))
        results = train(task, model_cfg, cfg, workdir)
    return dict(workdir=workdir, results=results, params=checkpoint_params(workdir),
                rows=read_metrics(workdir / "metrics.jsonl"), setup=(task, model_cfg, cfg))


@pytest.fixture(scope="module")
def preempted(tmp_path_factory, reference):
    """The reference's settings, SIGTERM at a random step: (workdir, the step it saved, the step signalled)."""
    workdir = tmp_path_factory.mktemp("preempted")
    task, model_cfg, cfg = reference["setup"]
    signalled = random.randrange(2, STEPS - 2)
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # if train() forgot its handler: fail, not kill pytest
    try:
        with pytest.raises(Preempted) as stop:
            train(SigtermAt(task, signalled), model_cfg, cfg, workdir)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return workdir, stop.value, signalled


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_final_step_is_checkpointed_and_restarting_a_finished_run_trains_nothing(reference, tmp_path, monkeypatch):
    assert sorted(finished_checkpoints(reference["workdir"])) == [10, 20, STEPS]  # 25 is no multiple of 10
    workdir = copy_run(reference["workdir"], tmp_path / "run")
    log_before = (workdir / "metrics.jsonl").read_text()
    steps_run, jitted_step = [], sleepjax.train._jitted_step

    class Counting:  # the jitted step, counting its calls (attributes such as .lower pass through)
        def __init__(self, step_fn):
            self.step_fn = step_fn

        def __call__(self, *args):
            steps_run.append(1)
            return self.step_fn(*args)

        def __getattr__(self, name):
            return getattr(self.step_fn, name)

    monkeypatch.setattr(sleepjax.train, "_jitted_step", lambda *args: Counting(jitted_step(*args)))
    task, model_cfg, cfg = reference["setup"]
    results = train(task, model_cfg, cfg, workdir)
    assert not steps_run, "a finished run must not train"
    assert (workdir / "metrics.jsonl").read_text() == log_before, "rows of a finished run were rewritten"
    assert results["steps"] == STEPS and results["final_eval"] == reference["results"]["final_eval"]
    # The timing is the whole run's, carried in the checkpoint, not the few seconds this launch took to restore.
    assert results["seconds_per_step"] == reference["results"]["seconds_per_step"] is not None
    assert results["wall_clock_s"] >= reference["results"]["wall_clock_s"]
    assert_bitwise_equal(checkpoint_params(workdir), reference["params"])


def test_sigterm_saves_exits_75_and_the_resumed_run_is_the_uninterrupted_one(reference, preempted, tmp_path):
    src, stop, signalled = preempted
    assert stop.code == PREEMPTED_EXIT_CODE == 75 and isinstance(stop, SystemExit)
    assert signalled <= stop.step < STEPS, (signalled, stop.step)
    assert stop.step in finished_checkpoints(src), "the preemption checkpoint is saved before the exit"
    # Every train row due up to the stop is flushed (none yet when the signal came before the first logging step).
    train_rows = [r["step"] for r in read_metrics(src / "metrics.jsonl") if r["kind"] == "train"]
    assert train_rows == list(range(SETTINGS["log_every"], stop.step + 1, SETTINGS["log_every"])), (train_rows, stop.step)
    assert any((src / "tb").iterdir()), "TensorBoard flushed"
    workdir = copy_run(src, tmp_path / "run")
    results = train(*reference["setup"], workdir)
    assert results["steps"] == STEPS
    assert_bitwise_equal(checkpoint_params(workdir), reference["params"], f"SIGTERM at step {signalled}")
    assert without_timing(read_metrics(workdir / "metrics.jsonl")) == without_timing(reference["rows"]), \
        f"the resumed log must be the uninterrupted one (SIGTERM at step {signalled}, saved {stop.step})"


# catches Ctrl-C that saves nothing (a traceback, the steps since the last checkpoint lost) or exits 75 / 1
def test_ctrl_c_saves_exits_130_and_the_resumed_run_is_the_uninterrupted_one(reference, tmp_path):
    task, model_cfg, cfg = reference["setup"]
    stop, at = LauncherStop(), random.randrange(3, STEPS - 3)
    with pytest.raises(Interrupted) as interrupted:
        train(CtrlCAt(task, at, stop), model_cfg, cfg, tmp_path / "run", stop=stop)
    assert interrupted.value.code == INTERRUPTED_EXIT_CODE == 130 and isinstance(interrupted.value, SystemExit)
    assert at - 1 <= interrupted.value.step < STEPS and interrupted.value.step in finished_checkpoints(tmp_path / "run")
    assert "interrupted: saved the checkpoint at step" in interrupted.value.message
    assert stop.calls == ["unsaved"], "train tells the launcher once a step is unsaved (not before the first)"
    resumed = LauncherStop()
    results = train(task, model_cfg, cfg, tmp_path / "run", stop=resumed)
    assert results["steps"] == STEPS and resumed.calls == ["unsaved", "saved"]
    assert_bitwise_equal(checkpoint_params(tmp_path / "run"), reference["params"], f"Ctrl-C at step {at}")
    assert without_timing(read_metrics(tmp_path / "run" / "metrics.jsonl")) == without_timing(reference["rows"])


# catches a SIGTERM during the last step that waits for the final evaluation (past the grace period) before saving
def test_sigterm_during_the_last_step_saves_it_and_leaves_its_evaluation_to_the_resumed_run(reference, tmp_path):
    task, model_cfg, cfg = reference["setup"]
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        with pytest.raises(Preempted) as stop:  # the batch after the last is prefetched during the last step
            train(SigtermAt(task, STEPS), model_cfg, cfg, tmp_path / "run")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stop.value.step == STEPS and STEPS in finished_checkpoints(tmp_path / "run")
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval"] == [10, 20]
    results = train(task, model_cfg, cfg, tmp_path / "run")
    assert results["final_eval"] == reference["results"]["final_eval"]
    assert without_timing(read_metrics(tmp_path / "run" / "metrics.jsonl")) == without_timing(reference["rows"])


@pytest.mark.parametrize("how", ["data", "metadata", "progress"])
def test_unreadable_newest_checkpoint_is_moved_aside_and_the_one_before_resumes(reference, tmp_path, capsys, how):
    workdir = copy_run(reference["workdir"], tmp_path / "run")
    if how == "progress":  # the JSON item beside the state: the run's progress at that step
        (workdir / "checkpoints" / str(STEPS) / rundir.PROGRESS_ITEM / "metadata").write_text("{not json")
    else:
        damage_checkpoint(workdir, STEPS, how)
    results = train(*reference["setup"], workdir)
    out = capsys.readouterr().out
    lines = [l for l in out.splitlines() if " is unreadable " in l]
    assert len(lines) == 1 and f"checkpoint at step {STEPS} is unreadable (" in lines[0], out
    assert "Error" in lines[0] and "moved it to" in lines[0], lines[0]  # the reason, from the storage layer
    assert "resumed from the checkpoint at step 20" in out
    kept = workdir / "damaged_checkpoints" / str(STEPS)
    assert kept.is_dir() and any(kept.rglob("*")), "the damaged checkpoint is kept for inspection"
    assert results["steps"] == STEPS and sorted(finished_checkpoints(workdir)) == [10, 20, STEPS]
    assert_bitwise_equal(checkpoint_params(workdir), reference["params"])
    assert without_timing(read_metrics(workdir / "metrics.jsonl")) == without_timing(reference["rows"])


def test_when_no_checkpoint_restores_nothing_is_moved_and_the_error_names_each(reference, tmp_path):
    workdir = copy_run(reference["workdir"], tmp_path / "run")
    for step in (10, 20, STEPS):
        damage_checkpoint(workdir, step, "data")
    with pytest.raises(UnreadableCheckpoints, match=r"step 25: .*Error.*; step 20: .*; step 10: "):
        train(*reference["setup"], workdir)
    assert sorted(finished_checkpoints(workdir)) == [10, 20, STEPS] and not (workdir / "damaged_checkpoints").exists()


def test_checkpoints_carry_the_progress_and_keep_checkpoints_prunes_it_with_them(reference):
    """The partial logging window, timing and sleep counts travel inside each orbax checkpoint (committed and
    pruned with the state), not in a side file."""
    workdir = reference["workdir"]
    assert not (workdir / rundir.LEGACY_LOG_WINDOW).exists()
    with rundir.open_checkpoints(workdir) as manager:
        progress = {step: rundir.restore_checkpoint(manager, step, None)[1] for step in manager.all_steps()}
    assert sorted(progress) == [10, 20, STEPS]
    assert progress[20]["steps"] == 20 % SETTINGS["log_every"] and progress[STEPS]["steps"] == 0
    assert progress[20]["sleep"]["should_sleep"] > 0 and progress[STEPS]["timing"]["steps_timed"] == STEPS - 1


@pytest.fixture(scope="module")
def legacy_run(tmp_path_factory, reference):
    """The reference run as the code before this change wrote it: state-only checkpoints (orbax's single default
    item) and each checkpoint's progress in ``log_window.json`` beside them, pruned with the checkpoints."""
    def open_checkpoints(workdir, keep=None):
        return ocp.CheckpointManager((Path(workdir) / "checkpoints").absolute(),
                                     options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def save_checkpoint(manager, step, state, progress, force=False):
        path = Path(manager.directory).parent / "log_window.json"
        saved = json.loads(path.read_text()) if path.exists() else {}
        keep = {str(s) for s in manager.all_steps()} | {str(step)}
        path.write_text(json.dumps({**{k: v for k, v in saved.items() if k in keep}, str(step): progress}))
        manager.save(step, args=ocp.args.StandardSave(state), force=force)

    workdir = tmp_path_factory.mktemp("legacy")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rundir, "open_checkpoints", open_checkpoints)
        mp.setattr(rundir, "save_checkpoint", save_checkpoint)
        train(*reference["setup"], workdir)
    assert sorted(json.loads((workdir / "log_window.json").read_text())) == ["10", "20", str(STEPS)]
    assert not (workdir / "checkpoints" / "20" / rundir.PROGRESS_ITEM).exists()
    shutil.rmtree(workdir / "checkpoints" / str(STEPS))  # resume from 20: two steps into a logging window
    return workdir


def test_a_run_written_before_checkpoints_carried_progress_resumes_from_log_window_json(reference, legacy_run,
                                                                                      tmp_path):
    workdir = copy_run(legacy_run, tmp_path / "run")
    results = train(*reference["setup"], workdir)
    assert_bitwise_equal(checkpoint_params(workdir), reference["params"])
    assert without_timing(read_metrics(workdir / "metrics.jsonl")) == without_timing(reference["rows"])
    assert results["sleep_counts"] == reference["results"]["sleep_counts"]
    assert (workdir / "checkpoints" / str(STEPS) / rundir.PROGRESS_ITEM).is_dir(), "new checkpoints carry it"


def test_a_run_written_before_checkpoints_carried_progress_without_log_window_json_is_refused(reference, legacy_run,
                                                                                            tmp_path):
    workdir = copy_run(legacy_run, tmp_path / "run")
    (workdir / "log_window.json").unlink()
    before = {name: (workdir / name).read_text() for name in ("config.json", "metrics.jsonl")}
    with pytest.raises(ValueError, match=r"checkpoint at step 20 .* was written before checkpoints carried the "
                                         r"run's progress, and .*log_window.json .* has no entry for step 20"):
        train(*reference["setup"], workdir)
    assert {name: (workdir / name).read_text() for name in before} == before


def test_larger_steps_extends_finished_and_interrupted_runs_alike(reference, preempted, tmp_path, capsys):
    """The learning-rate rule: the schedule of the run's first ``steps``, then its final rate. Extending the
    finished run (at 25) and the interrupted one (at a random step) must give the same parameters, bitwise;
    re-fitting the schedule to the new total would make them differ."""
    task, model_cfg, cfg = reference["setup"]
    longer = TrainConfig(**{**cfg.__dict__, "steps": STEPS + 10})
    finished = copy_run(reference["workdir"], tmp_path / "finished")
    results = train(task, model_cfg, longer, finished)
    assert "extending the run from 25 to 35 steps" in capsys.readouterr().out
    assert results["steps"] == STEPS + 10 and results["lr_schedule_steps"] == STEPS
    assert results["extended"] == [{"from_steps": STEPS, "to_steps": STEPS + 10, "at_step": STEPS}]
    saved = json.loads((finished / "config.json").read_text())
    assert saved["train"]["steps"] == STEPS + 10 and saved["extended"] == results["extended"]
    rows = [r for r in read_metrics(finished / "metrics.jsonl") if r["kind"] == "train"]
    assert without_timing([r for r in rows if r["step"] <= STEPS]) == \
        without_timing([r for r in reference["rows"] if r["kind"] == "train"])
    final = {k: cfg.final_lr_fraction * getattr(cfg, k) for k in ("adam_lr", "muon_lr")}
    for r in rows:
        if r["step"] > STEPS:
            assert r["adam_lr"] == pytest.approx(final["adam_lr"], rel=1e-6), r
            assert r["muon_lr"] == pytest.approx(final["muon_lr"], rel=1e-6), r

    src, stop, signalled = preempted
    interrupted = copy_run(src, tmp_path / "interrupted")
    results = train(task, model_cfg, longer, interrupted)
    assert results["extended"] == [{"from_steps": STEPS, "to_steps": STEPS + 10, "at_step": stop.step}]
    assert_bitwise_equal(checkpoint_params(interrupted), checkpoint_params(finished),
                         f"extended from step {stop.step} vs from {STEPS}")
    with pytest.raises(ValueError, match=r"holds a run of 35 steps \(train.steps\).*can only grow"):
        train(task, model_cfg, cfg, interrupted)


def test_throughput_counts_only_the_steps(reference):
    """On the reference's fake clock a step takes one second and every evaluation or save a million: no row may
    report a rate that includes them (the old accounting gave ~1e-6 steps/s on the rows after them)."""
    rows = [r for r in reference["rows"] if r["kind"] == "train"]
    rates = [r["steps_per_s"] for r in rows[1:]]
    assert len(rates) == len(rows) - 1 and min(rates) > 0.1, rates
    assert reference["results"]["seconds_per_step"] < 10
    assert rows[-1]["elapsed_s"] > STALL, "elapsed time still counts everything"


def test_other_setting_changes_are_still_refused_naming_them(reference, tmp_path):
    workdir = copy_run(reference["workdir"], tmp_path / "run")
    task, model_cfg, cfg = reference["setup"]
    before = (workdir / "config.json").read_text()
    with pytest.raises(ValueError, match=r"holds a run with other settings \(train.eval_size\)") as refused:
        train(task, model_cfg, TrainConfig(**{**cfg.__dict__, "steps": STEPS + 5, "eval_size": 31}), workdir)
    assert "train.steps" not in str(refused.value), "a larger steps alone is allowed"
    with pytest.raises(ValueError, match=r"other settings \(model.sleep_n\)"):
        train(task, model_cfg.replace(sleep_n=3), cfg, workdir)
    assert (workdir / "config.json").read_text() == before
