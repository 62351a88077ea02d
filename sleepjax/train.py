"""Training: the loop around the pure train step (``sleepjax/step.py``) with checkpoints, evaluation and logs.

``train`` reads as setup (the settings checked against the devices and the workdir's run), restore or init (the
newest readable checkpoint with the progress it carries, or step 0), then the loop; ``_Run`` holds one launch.
Batches are a pure function of (seed, step), so a run killed at any moment and started again with the same
workdir resumes from its last checkpoint and ends with exactly the parameters of an uninterrupted run. Preemption
(SIGTERM -> checkpoint, exit 75), unreadable checkpoints and extending a run (a larger ``steps``) are handled with
``sleepjax.resume``; a non-finite loss stops the run naming the step and the last good checkpoint. A launcher
passes ``stop`` (its SIGTERM / Ctrl-C handling, ``experiments/common.py``): the loop then also stops for Ctrl-C
(checkpoint, ``Interrupted``, exit 130) and tells it when a step is unsaved and when everything is saved again.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import math
import os
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from sleepjax import finetune
from sleepjax import model as model_lib
from sleepjax import mesh as mesh_lib, rundir
from sleepjax import step as step_lib
from sleepjax import schedule as schedule_lib
from sleepjax.config import ModelConfig
from sleepjax.evaluate import evaluate, evaluate_generation
from sleepjax.metrics_log import MetricsLog, RunProgress, format_duration
from sleepjax.optim import learning_rates, make_optimizer
from sleepjax.resume import (PREEMPTED_EXIT_CODE, Preempted, PreemptionNotice,  # noqa: F401 (re-exported)
                             UnreadableCheckpoints, check_same_run, progress_at, resolve_run_record,
                             restore_newest_readable, run_description, sync_processes, with_defaults)
from sleepjax.rundir import check_workdir  # noqa: F401 (re-exported: the launchers probe the workdir early)
from sleepjax.step import (TrainState, init_train_state, loss_and_grads,  # noqa: F401 (re-exported)
                           train_state_shardings, train_step)
from sleepjax.tasks import Task
from sleepjax.train_config import SCHEDULES, TrainConfig  # noqa: F401 (re-exported)

_now = time.perf_counter  # the loop's clock (a module attribute, so tests can drive it)

INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT: what a shell reports after Ctrl-C


class Interrupted(Preempted):
    """Raised by ``train`` once the checkpoint at ``step`` is saved after Ctrl-C (SIGINT, with a launcher's
    ``stop``): a SystemExit with code ``INTERRUPTED_EXIT_CODE``; resume by running the same command again."""

    def __init__(self, step: int, checkpoints):
        super().__init__(step, checkpoints)
        self.code = INTERRUPTED_EXIT_CODE
        self.message = (f"interrupted: saved the checkpoint at step {step} in {checkpoints}; exit code "
                        f"{INTERRUPTED_EXIT_CODE}: run the same command again to resume")


_OPTIMIZER_FIELDS = ("optimizer", "muon_lr", "adam_lr", "weight_decay", "warmup_steps", "lr_schedule",
                     "final_lr_fraction", "grad_clip")


_STEP_FIELDS = _OPTIMIZER_FIELDS + ("init_from", "insert_gdn", "insert_kind", "freeze", "freeze_steps", "grad_accum",
                                    "sleep_n_sample")


@functools.lru_cache(maxsize=8)
def _jitted_step(model_cfg: ModelConfig, step_settings: tuple, schedule_steps: int, mesh, hard_eviction: bool,
                 sleep_schedule: str):
    """The jitted train step for one sleep schedule, shared by the ``train`` calls of one process that train the
    same model with the same optimizer on the same mesh (a sweep over seeds, a run resumed in the same process):
    compiled once per schedule (once per run when the task's layout fixes it)."""
    cfg = TrainConfig(**dict(step_settings))  # only the optimizer's, freezing and accumulation fields are read
    tx = make_optimizer(cfg, schedule_steps)
    abstract = jax.eval_shape(lambda: init_train_state(model_cfg, cfg, tx))
    state_sharding = train_state_shardings(abstract, model_cfg, mesh)
    frozen = (finetune.frozen_mask(abstract.params, cfg.freeze, finetune.inserted_layers(model_cfg, cfg.insert_gdn))
              if cfg.freeze != "none" else None)
    step = functools.partial(train_step, tx=tx, sleep_schedule=sleep_schedule, grad_accum=cfg.grad_accum, frozen=frozen,
                             freeze_steps=cfg.freeze_steps, hard_eviction=hard_eviction)
    in_shardings = (state_sharding, mesh_lib.batch_sharding(mesh))
    if cfg.sleep_n_set:  # N-robust: the step's N is a traced argument, one program for every N of the set
        in_shardings += (mesh_lib.replicated(mesh),)
    return jax.jit(step, in_shardings=in_shardings, out_shardings=(state_sharding, mesh_lib.replicated(mesh)),
                   donate_argnums=0)


def batch_schedule(declared: str, loss_mask, window: int) -> tuple[str, list[str]]:
    """The schedule a batch runs: the task's ``declared`` one, with M in each window where it does not fit this
    batch (on any process of a multi-host run, each of which sees only its rows). Returns (schedule, why it was
    widened: one line per window that does not fit on this process)."""
    misfits = schedule_lib.misfits(declared, loss_mask, window)
    bad = np.zeros(len(declared), bool)
    bad[[w for w, _ in misfits]] = True
    if jax.process_count() > 1:  # every process must compile and run the same program
        bad = np.asarray(multihost_utils.process_allgather(bad)).reshape(-1, len(declared)).any(axis=0)
    return "".join(schedule_lib.MIXED if b else kind for b, kind in zip(bad, declared)), [why for _, why in misfits]


class Prefetcher:
    """Builds batch ``step + 1`` on a thread while step ``step`` trains. Batches stay a function of the step."""

    def __init__(self, make_batch):
        self._make = make_batch
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self._pending: dict[int, concurrent.futures.Future] = {}

    def get(self, step: int):
        future = self._pending.pop(step, None) or self._pool.submit(self._make, step)
        self._pending[step + 1] = self._pool.submit(self._make, step + 1)
        return future.result()

    def close(self):
        self._pool.shutdown(wait=False, cancel_futures=True)


def train(task: Task, model_cfg: ModelConfig, cfg: TrainConfig, workdir: str | os.PathLike, *,
          log_enabled: bool = True, stop=None) -> dict:
    """Trains ``model_cfg`` on ``task``; resumes from ``workdir``'s newest readable checkpoint if there is one
    (extending the run if ``cfg.steps`` grew; see the module docstring).

    Writes ``config.json``, ``metrics.jsonl``, ``tb/``, ``checkpoints/`` and ``results.json`` in workdir
    (``sleepjax/rundir.py``) and returns the results dict. Raises FloatingPointError (naming the step) if the loss
    stops being finite, and ``Preempted`` (exit code 75) after saving a checkpoint when SIGTERM arrives.

    ``stop`` (a launcher's; None: SIGTERM as above, Ctrl-C is Python's KeyboardInterrupt): ``stop.requested`` is
    the signal (SIGTERM or SIGINT) to stop for at the next step boundary, or None; the checkpoint is saved there
    and ``Preempted`` / ``Interrupted`` (exit code 130) raised. ``stop.unsaved()`` is called once this launch has
    trained a step (until then a stop loses nothing), ``stop.saved()`` when train returns.
    """
    workdir, mesh = _check_setup(task, model_cfg, cfg, workdir)
    description = run_description(task, model_cfg, cfg)
    saved = with_defaults(rundir.read_run_record(workdir))
    with rundir.open_checkpoints(workdir) as probe:
        check_same_run(workdir, saved, description, has_checkpoint=probe.latest_step() is not None)
    sync_processes("sleepjax_read_config")  # process 0 rewrites config.json below
    run = _Run(task, model_cfg, cfg, workdir, mesh, stop)
    if cfg.init_from:
        run.say(_init_from_line(checkpoint_summary(cfg, model_cfg), cfg))
    try:
        run.restore_or_init(saved, description)
        run.open_logs(saved, log_enabled)
        run.loop()
    finally:
        run.close()
    results = run.results()
    if stop is not None:
        stop.saved()
    return results


def checkpoint_summary(cfg: TrainConfig, model_cfg: ModelConfig) -> dict | None:
    """What a fine-tuning run starts from (None without ``init_from``): the checkpoint's path and model_type, and
    the model trained (the loaded ModelConfig's layers and width, inserted layers included)."""
    if not cfg.init_from:
        return None
    path = Path(cfg.init_from)
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    return {"path": str(path.absolute()), "model_type": model_type, "layers": list(model_cfg.layers),
            "num_layers": len(model_cfg.layers), "d_model": model_cfg.d_model, "vocab_size": model_cfg.vocab_size,
            "loop_steps": model_cfg.loop_steps, "inserted_layers": cfg.insert_gdn,
            "insert_kind": cfg.insert_kind if cfg.insert_gdn else None}


def learning_rates_summary(cfg: TrainConfig) -> dict:
    """The optimizer and its peak rates and warm-up, as results.json and results.md name them."""
    return {"optimizer": cfg.optimizer, **({"muon_lr": cfg.muon_lr} if cfg.optimizer == "muon" else {}),
            "adam_lr": cfg.adam_lr, "warmup_steps": cfg.warmup_steps}


def _init_from_line(summary: dict, cfg: TrainConfig) -> str:
    inserted = (f" ({summary['inserted_layers']} inserted {summary['insert_kind']})" if summary["inserted_layers"]
                else "")
    loops = f", {summary['loop_steps']} loops per pass" if summary["loop_steps"] > 1 else ""
    rates = ", ".join(f"{k} {v}" for k, v in learning_rates_summary(cfg).items())
    return (f"init_from: {summary['path']} (model_type {summary['model_type']}): {summary['num_layers']} layers "
            f"{','.join(summary['layers'])}{inserted}, d_model {summary['d_model']}, vocab {summary['vocab_size']}"
            f"{loops}; {rates}")


def check_setup(task: Task, model_cfg: ModelConfig, cfg: TrainConfig, workdir) -> None:
    """Raises ValueError unless the settings fit the task, the devices and a writable workdir (what ``train``
    checks first; a launcher calls it before any work)."""
    _check_setup(task, model_cfg, cfg, workdir)


def _check_setup(task: Task, model_cfg: ModelConfig, cfg: TrainConfig, workdir) -> tuple:
    """(workdir, mesh), once the settings fit the task, the devices and a writable workdir: before any work."""
    if task.vocab_size > model_cfg.vocab_size or (task.vocab_size < model_cfg.vocab_size and not cfg.init_from):
        raise ValueError(f"model vocab_size ({model_cfg.vocab_size}) must equal the task's ({task.vocab_size}); a "
                         f"pretrained model (init_from) may have more")
    if cfg.sleep_n_set and max(cfg.sleep_n_set) != model_cfg.sleep_n:
        raise ValueError(f"sleep_n_sample {cfg.sleep_n_sample!r} needs the model's sleep_n to be its largest N "
                         f"({max(cfg.sleep_n_set)}), got {model_cfg.sleep_n}")
    workdir = rundir.check_workdir(workdir)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    shards = mesh_lib.batch_size_per_shard(mesh)
    for name in ("batch_size", "eval_batch_size"):
        if getattr(cfg, name) % shards:
            raise ValueError(f"{name} ({getattr(cfg, name)}) must be a multiple of the data x fsdp mesh size "
                             f"({shards})")
    if cfg.batch_size % (shards * cfg.grad_accum):
        raise ValueError(f"batch_size ({cfg.batch_size}) must be a multiple of grad_accum ({cfg.grad_accum}) x the "
                         f"data x fsdp mesh size ({shards}): every device holds rows of every micro-batch")
    mesh_lib.check_heads(model_cfg, mesh)
    if cfg.eval_mode == "generate" and mesh.size > 1:
        raise ValueError("eval_mode='generate' runs on one device for now (sleepjax.generate has no mesh): use "
                         "eval_mode='teacher_forced' on this mesh, or score generations after training")
    return workdir, mesh


class _Run:
    """One launch of ``train``, in the order ``train`` calls it: ``restore_or_init`` (the newest readable
    checkpoint and the progress it carries, or step 0), ``open_logs``, then ``loop`` to ``cfg.steps``; ``close``
    releases what it holds whatever happened, ``results`` summarises the run."""

    def __init__(self, task: Task, model_cfg: ModelConfig, cfg: TrainConfig, workdir, mesh, stop=None):
        self.task, self.model_cfg, self.cfg, self.workdir, self.mesh = task, model_cfg, cfg, workdir, mesh
        self.stop = stop  # a launcher's SIGTERM / Ctrl-C handling (see train)
        self.lead = jax.process_index() == 0  # the one writer of shared files
        self.batch_sharding = mesh_lib.batch_sharding(mesh)
        self.manager = self.log = self.prefetch = self.notice = None
        self.warned: set[str] = set()
        self.last_eval: dict = {}

    def say(self, text: str) -> None:
        if self.lead:
            print(text, flush=True)

    # --- restore or init

    def restore_or_init(self, saved: dict | None, description: dict) -> None:
        cfg, model_cfg = self.cfg, self.model_cfg
        abstract = jax.eval_shape(lambda: init_train_state(model_cfg, cfg, make_optimizer(cfg)))  # any schedule
        self.state_sharding = train_state_shardings(abstract, model_cfg, self.mesh)
        target = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                        abstract, self.state_sharding)
        self.manager, state, progress, self.start = restore_newest_readable(
            lambda: rundir.open_checkpoints(self.workdir, cfg.keep_checkpoints), target, self.workdir, self.say)
        self.progress = RunProgress(progress_at(self.workdir, self.start, progress), model_lib.SLEEP_COUNTS)
        self.record = resolve_run_record(saved, description, self.start)
        if self.lead and self.record != saved:
            rundir.write_run_record(self.workdir, self.record)
        self.schedule_steps = self.record["lr_schedule_steps"]
        self.declared = self.task.sleep_schedule(model_cfg.window)  # which windows sleep, as the layout fixes it
        self.state = state if state is not None else self._init_state()
        batch_abstract = {name: jax.ShapeDtypeStruct((cfg.batch_size, self.task.seq_len), dtype,
                                                     sharding=self.batch_sharding)
                          for name, dtype in (("tokens", jnp.int32), ("loss_mask", jnp.bool_))}
        self.say(step_lib.memory_summary(self._step_fn(cfg.steps, self.declared), self.state, batch_abstract, self.mesh,
                                model_cfg, cfg))

    def _init_state(self):
        """Step 0: the pretrained checkpoint's parameters (``init_from``) or fresh ones from ``cfg.seed``. jit with
        out_shardings: every device initialises only its shard (same values on any mesh)."""
        cfg, model_cfg = self.cfg, self.model_cfg
        tx = make_optimizer(cfg, self.schedule_steps)
        if cfg.init_from:
            pretrained = finetune.pretrained_params(cfg.init_from, model_cfg, cfg.insert_gdn, cfg.seed,
                                                      cfg.insert_kind)
            return jax.jit(lambda p: init_train_state(model_cfg, cfg, tx, p),
                           out_shardings=self.state_sharding)(pretrained)
        return jax.jit(lambda: init_train_state(model_cfg, cfg, tx), out_shardings=self.state_sharding)()

    def _step_fn(self, step: int, schedule: str):
        """The jitted step that trains step ``step`` + 1 with ``schedule``: a sliding-eviction model trains with
        hard eviction for its first ``warmup_eviction_steps`` (the paper's warm-up)."""
        hard = self.model_cfg.eviction == "sliding" and step < self.cfg.warmup_eviction_steps
        settings = tuple((k, getattr(self.cfg, k)) for k in _STEP_FIELDS)
        return _jitted_step(self.model_cfg, settings, self.schedule_steps, self.mesh, hard, schedule)

    def open_logs(self, saved: dict | None, log_enabled: bool) -> None:
        cfg, start, task = self.cfg, self.start, self.task
        # A resumed run scores its first step again when that is an evaluation step (a preempted run skips the
        # evaluation it was due, so its grace period goes to the checkpoint); the log keeps one row per evaluation.
        self.eval_at_start = start > 0 and (start % cfg.eval_every == 0 or start == cfg.steps)
        self.log = MetricsLog(self.workdir, resume_step=start, enabled=log_enabled and self.lead,
                              redo_eval=self.eval_at_start)
        if start:
            extending = saved is not None and cfg.steps > saved["train"]["steps"]
            self.log.line(f"resumed from the checkpoint at step {start} in {self.workdir}" + (
                f"; extending the run from {saved['train']['steps']} to {cfg.steps} steps (learning rate: the "
                f"schedule of its first {self.schedule_steps} steps, then that schedule's final rate)"
                if extending else ""), final=True)
        self.eval_batches = task.eval_set(cfg.eval_seed, cfg.eval_size, cfg.eval_batch_size)
        rows = mesh_lib.local_rows(self.batch_sharding, (cfg.batch_size,))
        self.prefetch = Prefetcher(functools.partial(_batch_of, task, cfg, rows))
        self.notice = PreemptionNotice()
        self.lr_at = learning_rates(cfg, self.schedule_steps)
        self.t_run = _now()
        finished = rundir.read_results(self.workdir) if start == cfg.steps else None
        if finished:  # a finished run's own record also counts its end (evaluation, the last save)
            self.progress.wall_before = max(self.progress.wall_before, finished.get("wall_clock_s", 0.0))

    # --- the loop

    def loop(self) -> None:
        cfg = self.cfg
        if self.eval_at_start:
            self.evaluate(self.start)
        for step in range(self.start, cfg.steps):
            self.progress.add(self.train_step(step))
            if step == self.start and self.stop is not None:
                self.stop.unsaved()  # until now a stop lost nothing (the launcher exits at once)
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                self.log_row(done)
            # asked at every step (the multi-process protocol); at the last one too: its evaluation is left to the
            # resumed run, so a notice that comes during the last step does not wait for it
            if self.notice.reached(done) or (self.stop is not None and self.stop.requested is not None):
                self.preempt(done)
            if done % cfg.eval_every == 0 or done == cfg.steps:
                self.evaluate(done)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:  # the final step always
                self.save(done)

    def train_step(self, step: int) -> dict:
        """Trains step ``step`` + 1 and returns its metrics; a non-finite loss stops the run right there."""
        t0 = _now()  # step time: the batch, the step and the loss sync; never evaluation or checkpoints
        batch = self.prefetch.get(step)
        schedule, misfits = batch_schedule(self.declared, batch["loss_mask"], self.model_cfg.window)
        if schedule != self.declared:
            self.warn_once(f"schedule_{schedule}", f"the batch of step {step + 1} does not fit the task's sleep "
                           f"schedule {self.declared!r} ({'; '.join(misfits) or 'on another process'}): it runs as "
                           f"{schedule!r} (M: sleep decided per example, N passes for the batch), compiled once more")
        batch = mesh_lib.global_batch(self.batch_sharding, {k: batch[k] for k in ("tokens", "loss_mask")},
                                      self.cfg.batch_size)
        sampled = (jnp.int32(self.cfg.sleep_passes_at(step)),) if self.cfg.sleep_n_set else ()
        with jax.set_mesh(self.mesh):  # the model reads the mesh to run its kernels under shard_map
            self.state, metrics = self._step_fn(step, schedule)(self.state, batch, *sampled)
        loss = float(metrics["loss"])  # one host sync per step
        if step > self.start:  # the first step of a process includes compilation
            self.progress.rate.add(_now() - t0)
        if not math.isfinite(loss):
            last = self.manager.latest_step()
            raise FloatingPointError(
                f"loss is {loss} at step {step + 1}: stopping. " +
                (f"The last good checkpoint (step {last}) is kept in {self.workdir / rundir.CHECKPOINTS}"
                 if last is not None else "No checkpoint was saved before it: a new launch starts from step 0"))
        return metrics

    def log_row(self, done: int) -> None:
        cfg, tokens_per_step = self.cfg, self.cfg.batch_size * self.task.seq_len
        steps_per_s = self.progress.rate.take()  # None for a window of only a process's first (compiling) step
        row = {**self.progress.mean.take(), **self.lr_at(done), "sequences": done * cfg.batch_size,
               "tokens": done * tokens_per_step, **_epochs_at(cfg, done), "elapsed_s": _now() - self.t_run}
        row["slept_fraction"] = model_lib.slept_fraction(row)
        if row["slept_fraction"] < 1.0 or row["slept_supervised"] > 0:
            self.warn_once("train_slept", f"steps up to {done}: only {row['slept_fraction']:.4f} of the "
                           f"example-windows that should have slept did, and {row['slept_supervised']:.1f} "
                           "supervised example-windows per step slept")
        if steps_per_s is not None:
            row.update(steps_per_s=steps_per_s, tokens_per_s=steps_per_s * tokens_per_step)
        self.log.write(done, "train", row)
        eta = (cfg.steps - done) / steps_per_s if steps_per_s else float("nan")
        speed = f"{row['tokens_per_s'] / 1e3:.1f}k tok/s" if steps_per_s else "compiling"
        epoch = f"  epoch {row['epoch']:.2f}/{_epochs_at(cfg, cfg.steps)['epoch']:.2f}" if "epoch" in row else ""
        self.log.line(f"step {done}/{cfg.steps}{epoch}  loss {row['loss']:.4f}  acc {row['accuracy']:.3f}  "
                      f"slept {row['slept_fraction']:.2f}  {speed}  ETA {format_duration(eta)}  "
                      f"(eval exact {self.last_eval.get('exact', float('nan')):.3f})")

    def evaluate(self, step: int) -> None:
        task, cfg = self.task, self.cfg
        result = evaluate(self.state.params, self.eval_batches, num_items=task.num_items,
                          difficulty_name=task.difficulty_name, put=_put_replicated(self.mesh),
                          schedule=self.declared)
        for n in cfg.sleep_n_set:  # an N-robust model is scored at every N it trained with
            at_n = result if n == self.model_cfg.sleep_n else evaluate(
                self.state.params.replace(config=self.model_cfg.replace(sleep_n=n)), self.eval_batches,
                num_items=task.num_items, difficulty_name=task.difficulty_name, put=_put_replicated(self.mesh),
                schedule=self.declared)
            result = {**result, f"exact@N={n}": at_n["exact"], f"loss@N={n}": at_n["loss"]}
        if cfg.eval_mode == "generate":  # answers written by the model itself, beside teacher forcing
            result.update(evaluate_generation(self.state.params, self.eval_batches, num_items=task.num_items,
                                              difficulty_name=task.difficulty_name, sleep=cfg.eval_generation_sleep,
                                              teacher_forced=False))
        self.last_eval = result
        if result["slept_fraction"] < 1.0:
            self.warn_once("eval_slept", f"evaluation at step {step}: only {result['slept_fraction']:.4f} of the "
                           "example-windows that should have slept did")
        self.log.write(step, "eval", {**result, "sequences": step * cfg.batch_size,
                                      "tokens": step * cfg.batch_size * task.seq_len, **_epochs_at(cfg, step)})
        generated = f"generated {result['exact_generated']:.3f}  " if "exact_generated" in result else ""
        passes = ""
        if self.model_cfg.sleep_tol > 0 and "passes_mean" in result:  # adaptive depth: where the windows stopped
            hist = " ".join(f"{k.split('/')[1]}:{v:.2f}" for k, v in result.items() if k.startswith("passes_hist/"))
            passes = f"passes {result['passes_mean']:.2f} [{hist}]  "
        self.log.line(f"eval @ {step}: exact {result['exact']:.3f}  {generated}loss {result['loss']:.4f}  "
                      f"slept {result['slept_fraction']:.2f}  {passes}" +
                      "  ".join(f"{k.split('/')[1]}:{v:.2f}" for k, v in result.items() if k.startswith("exact/")),
                      final=True)

    def save(self, step: int, force: bool = False) -> None:
        """The state and the run's progress at ``step`` (so a resume here logs the same rows), one checkpoint."""
        rundir.save_checkpoint(self.manager, step, self.state, self.progress.state(self.wall_clock()), force=force)

    def preempt(self, done: int) -> None:
        """A preemption notice (or Ctrl-C): the checkpoint at this step boundary, the logs flushed, then exit code
        75 (``Preempted``; Ctrl-C: 130, ``Interrupted``)."""
        self.save(done, force=True)
        self.manager.wait_until_finished()
        self.log.flush()
        ctrl_c = self.stop is not None and self.stop.requested == signal.SIGINT
        error = (Interrupted if ctrl_c else Preempted)(done, self.workdir / rundir.CHECKPOINTS)
        self.log.line(error.message, final=True)
        raise error

    def warn_once(self, key: str, text: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            self.log.line(f"WARNING: {text}", final=True)

    def wall_clock(self) -> float:
        """Seconds the whole run has taken: the launches before this one and this one so far."""
        return self.progress.wall_before + _now() - self.t_run

    # --- the end

    def close(self) -> None:
        for part in (self.notice, self.prefetch):
            if part is not None:
                part.close()
        if self.manager is not None:
            self.manager.wait_until_finished()
            self.manager.close()
        if self.log is not None:
            self.log.close()

    def results(self) -> dict:
        cfg, step, sleep = self.cfg, int(self.state.step), self.progress.sleep
        results = {
            "task": self.task.name, "sleep_n": self.model_cfg.sleep_n, "seed": cfg.seed, "steps": step,
            "sequences": step * cfg.batch_size, "tokens": step * cfg.batch_size * self.task.seq_len,
            **_epochs_at(cfg, step),
            "num_params": model_lib.num_params(self.state.params), "difficulty_name": self.task.difficulty_name,
            "seconds_per_step": self.progress.rate.seconds_per_step(), "wall_clock_s": self.wall_clock(),
            "final_eval": self.last_eval, "devices": jax.device_count(), "mesh": dict(self.mesh.shape),
            "lr_schedule_steps": self.schedule_steps, "extended": self.record["extended"],
            "sleep_schedule": self.declared, "slept_fraction": {"train": model_lib.slept_fraction(sleep),
                                                                "eval": self.last_eval.get("slept_fraction")},
            "sleep_counts": {"train": sleep}, "learning_rates": learning_rates_summary(cfg),
        }
        if cfg.init_from:
            results["init_from"] = checkpoint_summary(cfg, self.model_cfg)
        if self.lead:
            rundir.write_results(self.workdir, results)
        return results


def _batch_of(task: Task, cfg: TrainConfig, rows: slice, step: int) -> dict:
    """This process's rows of the batch of ``step``: a pure function of (seed, step) (with ``train_examples``, of
    the fixed training set in each epoch's order: ``sleepjax/tasks/base.py``, ``batch_indices``)."""
    return task.batch(cfg.seed, step, cfg.batch_size, rows=rows, train_examples=cfg.train_examples)


def _epochs_at(cfg: TrainConfig, step: int) -> dict:
    """{"epoch": passes made over the fixed training set after ``step`` steps} (fractional), or {} for a stream."""
    return {"epoch": step * cfg.batch_size / cfg.train_examples} if cfg.train_examples else {}


def _put_replicated(mesh):
    """Places a host array on every device (several processes: each holds the whole array, e.g. an eval batch)."""
    if jax.process_count() == 1:
        return jnp.asarray
    replicated = mesh_lib.replicated(mesh)
    return lambda x: jax.make_array_from_process_local_data(replicated, x, x.shape)


def load_run(workdir: str | os.PathLike, step: int | None = None):
    """A finished or interrupted run: (params of its checkpoint (latest by default), ModelConfig, TrainConfig,
    task). Everything is rebuilt from the run's ``config.json``."""
    from sleepjax import tasks

    saved = rundir.read_run_record(workdir)
    if saved is None:
        raise ValueError(f"no run in {workdir}: it has no {rundir.CONFIG}")
    model_cfg = ModelConfig(**saved["model"])
    cfg = TrainConfig(**saved["train"])
    task = tasks.get(saved["task"], **saved["task_options"])
    return load_params(workdir, model_cfg, cfg, step), model_cfg, cfg, task


def load_params(workdir: str | os.PathLike, model_cfg: ModelConfig, cfg: TrainConfig, step: int | None = None):
    """The parameters of a run's checkpoint (latest by default), replicated on this process's devices (whatever
    mesh or number of processes wrote it)."""
    replicated = mesh_lib.replicated(mesh_lib.make_mesh(""))
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                                      jax.eval_shape(lambda: init_train_state(model_cfg, cfg, make_optimizer(cfg))))
    with rundir.open_checkpoints(workdir) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"no checkpoint in {workdir}")
        return rundir.restore_checkpoint(manager, step, abstract, with_progress=False)[0].params
