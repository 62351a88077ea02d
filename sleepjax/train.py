"""Training: a pure, jitted train step and a plain loop around it (checkpoints, evaluation, logs).

Batches are a pure function of (seed, step), so a run killed at any moment and started again with the same
workdir resumes from its last checkpoint and ends with exactly the parameters of an uninterrupted run. Preemption
(SIGTERM -> checkpoint, exit 75), unreadable checkpoints and extending a run (a larger ``steps``) are handled with
``sleepjax.resume``; a non-finite loss stops the run naming the step and the last good checkpoint.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from sleepjax import finetune
from sleepjax import model as model_lib
from sleepjax import optim, sharding
from sleepjax import schedule as schedule_lib
from sleepjax.config import ModelConfig
from sleepjax.evaluate import evaluate
from sleepjax.metrics_log import MetricsLog, Throughput, Window, WindowStore, format_duration
from sleepjax.resume import (PREEMPTED_EXIT_CODE, Preempted, PreemptionNotice,  # noqa: F401 (re-exported)
                             UnreadableCheckpoints, check_same_run, read_run_record, resolve_run_record,
                             restore_newest_readable, sync_processes, write_json)
from sleepjax.tasks import Task

SCHEDULES = ("cosine", "constant")
_now = time.perf_counter  # the loop's clock (a module attribute, so tests can drive it)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train. ``eval_seed`` names the held-out stream (test split) scored every ``eval_every`` steps."""

    steps: int = 2000
    batch_size: int = 64
    seed: int = 0
    optimizer: str = "muon"
    muon_lr: float = 2e-3
    adam_lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_steps: int = 100
    lr_schedule: str = "cosine"
    final_lr_fraction: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_size: int = 512
    eval_batch_size: int = 256
    eval_seed: int = 10_000
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    mesh: str = ""
    # K micro-batches per optimizer step (batch_size / K sequences each, gradients summed): the update of the full
    # batch, for a fraction of its activation memory.
    grad_accum: int = 1
    # Fine-tuning (sleepjax/finetune.py): start from a pretrained checkpoint directory, with insert_gdn fresh GDN
    # layers; freeze="pretrained" trains only those layers for freeze_steps steps (0: the whole run).
    init_from: str = ""
    insert_gdn: int = 0
    freeze: str = "none"
    freeze_steps: int = 0
    # A sliding-eviction model trains with hard eviction for its first warmup_eviction_steps steps (the paper's
    # warm-up, which it calls crucial for N > 1).
    warmup_eviction_steps: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_every", "eval_size", "eval_batch_size", "checkpoint_every",
                     "keep_checkpoints", "log_every", "grad_accum"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        for name in ("muon_lr", "adam_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0")
        if self.optimizer not in optim.OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {optim.OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}")
        if not 0 <= self.final_lr_fraction <= 1:
            raise ValueError(f"final_lr_fraction must lie in [0, 1], got {self.final_lr_fraction}")
        for name in ("insert_gdn", "freeze_steps", "warmup_eviction_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.freeze not in finetune.FREEZE:
            raise ValueError(f"freeze must be one of {finetune.FREEZE}, got {self.freeze!r}")
        if self.freeze != "none" and not self.insert_gdn:
            raise ValueError("freeze='pretrained' needs insert_gdn > 0: it trains only the inserted layers")
        if self.insert_gdn and not self.init_from:
            raise ValueError("insert_gdn needs init_from (the pretrained checkpoint to insert layers into)")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: model_lib.Params
    opt_state: Any


def make_optimizer(cfg: TrainConfig, schedule_steps: int | None = None) -> optax.GradientTransformation:
    """The optimizer of ``cfg``; its learning-rate schedule spans ``schedule_steps`` (default ``cfg.steps``) and
    stays at its final value after them (how an extended run trains its added steps)."""
    return optim.make_optimizer(name=cfg.optimizer, total_steps=schedule_steps or cfg.steps, muon_lr=cfg.muon_lr,
                                adam_lr=cfg.adam_lr, warmup_steps=cfg.warmup_steps, schedule_kind=cfg.lr_schedule,
                                final_lr_fraction=cfg.final_lr_fraction, weight_decay=cfg.weight_decay,
                                grad_clip=cfg.grad_clip or None)


def learning_rates(cfg: TrainConfig, schedule_steps: int):
    """step -> {"adam_lr", ["muon_lr"]}: the rates the optimizer applied at that (1-based) step, for the logs."""
    peaks = {"adam_lr": cfg.adam_lr, **({"muon_lr": cfg.muon_lr} if cfg.optimizer == "muon" else {})}
    fns = {k: optim.schedule(v, schedule_steps, cfg.warmup_steps, cfg.lr_schedule, cfg.final_lr_fraction)
           for k, v in peaks.items()}
    return lambda step: {k: float(fn(step - 1)) for k, fn in fns.items()}


def init_train_state(model_cfg: ModelConfig, cfg: TrainConfig, tx, params=None) -> TrainState:
    """Step 0: fresh parameters from ``cfg.seed``, or ``params`` (e.g. a pretrained checkpoint's)."""
    params = model_lib.init(model_cfg, jax.random.PRNGKey(cfg.seed)) if params is None else params
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def train_state_shardings(abstract_state, model_cfg: ModelConfig, mesh):
    """Parameters and the optimizer moments that mirror them sharded by the logical-axis rules
    (``sharding.LOGICAL_RULES``); step counters and scalars replicated."""
    return sharding.tree_shardings(abstract_state, mesh, lambda path: model_lib.logical_axes_at(path, model_cfg))


def _micro_batches(x, k: int):
    """[B, ...] -> [k, B / k, ...]: micro-batch i holds rows i, i + k, i + 2k, ... so that each device of a
    batch-sharded mesh contributes the same number of rows to every micro-batch."""
    return x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1)


def loss_and_grads(params, tokens, loss_mask, *, schedule: str | None = None, grad_accum: int = 1):
    """(metrics, gradients) of the masked mean cross-entropy of a batch, computed over ``grad_accum``
    micro-batches: each contributes its summed cross-entropy divided by the WHOLE batch's supervised count, so the
    summed gradients are the full batch's (up to float rounding). Metrics as ``model.loss`` gives them."""
    count = jnp.maximum(jnp.asarray(loss_mask)[:, :-1].sum(), 1).astype(jnp.float32)

    def micro(params, tokens, loss_mask):
        ce, correct, mask, passes = model_lib.token_stats(params, tokens, loss_mask, schedule=schedule,
                                                          return_passes=True)
        total = (ce * mask).sum()
        return total / count, {"ce": total, "correct": (correct * mask).sum(), "supervised": mask.sum(),
                               **model_lib.sleep_counts(params.config, loss_mask, passes)}

    grad_fn = jax.value_and_grad(micro, has_aux=True)
    if grad_accum == 1:
        (_, sums), grads = grad_fn(params, tokens, loss_mask)
    else:
        def body(acc, xs):
            (_, sums), grads = grad_fn(params, *xs)
            return jax.tree_util.tree_map(jnp.add, acc, (grads, sums)), None

        xs = (_micro_batches(tokens, grad_accum), _micro_batches(jnp.asarray(loss_mask), grad_accum))
        (_, sums), grads = jax.eval_shape(grad_fn, params, *(x[0] for x in xs))
        zeros = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), (grads, sums))
        (grads, sums), _ = jax.lax.scan(body, zeros, xs)
    metrics = {"loss": sums["ce"] / count, "accuracy": sums["correct"] / count,
               **{k: v for k, v in sums.items() if k not in ("ce", "correct")}}
    return metrics, grads


def train_step(state: TrainState, batch: dict, *, tx, sleep_schedule: str | None = None, grad_accum: int = 1, frozen=None,
               freeze_steps: int = 0, hard_eviction: bool = False) -> tuple[TrainState, dict]:
    """One optimizer step on ``batch`` (tokens, loss_mask) run with ``sleep_schedule`` (one letter per
    window, ``sleepjax/schedule.py``; it must fit the batch; None: M everywhere, right for any batch at N passes
    per window) over ``grad_accum`` micro-batches. Pure: returns the new state and metrics.

    frozen: a pytree of bools like the params (``finetune.frozen_mask``): those parameters stay put while
    ``state.step < freeze_steps`` (0: always). hard_eviction: compute the loss with hard eviction whatever the
    model's policy (the warm-up of a sliding-eviction model)."""
    params = state.params
    loss_params = params.replace(config=params.config.replace(eviction="hard")) if hard_eviction else params
    metrics, grads = loss_and_grads(loss_params, batch["tokens"], batch["loss_mask"], schedule=sleep_schedule,
                                    grad_accum=grad_accum)
    grads = grads.replace(config=params.config)
    if frozen is not None:
        grads = finetune.hold_frozen(grads, frozen, state.step, freeze_steps)
    updates, opt_state = tx.update(grads, state.opt_state, params)
    if frozen is not None:
        updates = finetune.hold_frozen(updates, frozen, state.step, freeze_steps)
    params = optax.apply_updates(params, updates)
    metrics = {**metrics, "grad_norm": optax.tree.norm(grads)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


_OPTIMIZER_FIELDS = ("optimizer", "muon_lr", "adam_lr", "weight_decay", "warmup_steps", "lr_schedule",
                     "final_lr_fraction", "grad_clip")


_STEP_FIELDS = _OPTIMIZER_FIELDS + ("init_from", "insert_gdn", "freeze", "freeze_steps", "grad_accum")


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
    return jax.jit(step, in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                   out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=0)


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


def _with_defaults(saved: dict | None) -> dict | None:
    """A config.json written before a ModelConfig/TrainConfig field existed: that field at its default (what the
    run used), so such runs still resume."""
    if saved is None:
        return None
    model = json.loads(json.dumps(dataclasses.asdict(ModelConfig())))
    train = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(TrainConfig()))).items() if k != "mesh"}
    return {**saved, "model": {**model, **saved.get("model", {})}, "train": {**train, **saved.get("train", {})}}


def memory_summary(step_fn, state, batch_abstract, mesh, model_cfg: ModelConfig, cfg: TrainConfig) -> str:
    """One line: parameter count and XLA's estimate of one train step's memory per device (arguments: parameters,
    optimizer state and the batch shard; temporaries: activations kept for the backward and workspace)."""
    with jax.set_mesh(mesh):
        analysis = step_fn.lower(state, batch_abstract).compile().memory_analysis()
    count = model_lib.num_params(state.params)
    size = f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.2f}M" if count >= 1e6 else f"{count / 1e3:.1f}k"
    head = f"model: {size} parameters; N = {model_cfg.sleep_n}, batch {cfg.batch_size}, mesh {dict(mesh.shape)}"
    if analysis is None:
        return head + "; this backend gives no memory estimate"
    gb = lambda b: f"{b / 2**30:.2f} GiB" if b >= 2**28 else f"{b / 2**20:.1f} MiB"
    return (f"{head}; train step per device: {gb(analysis.argument_size_in_bytes)} parameters + optimizer state "
            f"+ batch, {gb(analysis.temp_size_in_bytes)} temporaries (remat={model_cfg.remat})")


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


def _run_description(task: Task, model_cfg: ModelConfig, cfg: TrainConfig) -> dict:
    return {"task": task.name, "task_options": getattr(task, "options", {}), "model": dataclasses.asdict(model_cfg),
            "train": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("mesh",)}}


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
          log_enabled: bool = True) -> dict:
    """Trains ``model_cfg`` on ``task``; resumes from ``workdir``'s newest readable checkpoint if there is one
    (extending the run if ``cfg.steps`` grew; see the module docstring).

    Writes ``config.json``, ``metrics.jsonl``, ``tb/``, ``checkpoints/`` and ``results.json`` in workdir and
    returns the results dict. Raises FloatingPointError (naming the step) if the loss stops being finite, and
    ``Preempted`` (exit code 75) after saving a checkpoint when SIGTERM arrives.
    """
    if task.vocab_size > model_cfg.vocab_size or (task.vocab_size < model_cfg.vocab_size and not cfg.init_from):
        raise ValueError(f"model vocab_size ({model_cfg.vocab_size}) must equal the task's ({task.vocab_size}); a "
                         f"pretrained model (init_from) may have more")
    workdir = check_workdir(workdir)
    mesh = sharding.make_mesh(cfg.mesh)
    shards = sharding.batch_size_per_shard(mesh)
    for name in ("batch_size", "eval_batch_size"):
        if getattr(cfg, name) % shards:
            raise ValueError(f"{name} ({getattr(cfg, name)}) must be a multiple of the data x fsdp mesh size "
                             f"({shards})")
    if cfg.batch_size % (shards * cfg.grad_accum):
        raise ValueError(f"batch_size ({cfg.batch_size}) must be a multiple of grad_accum ({cfg.grad_accum}) x the "
                         f"data x fsdp mesh size ({shards}): every device holds rows of every micro-batch")
    sharding.check_heads(model_cfg, mesh)
    lead = jax.process_index() == 0  # the one writer of shared files; every process reads config.json first
    say = (lambda text: print(text, flush=True)) if lead else (lambda text: None)
    description = _run_description(task, model_cfg, cfg)
    saved = _with_defaults(read_run_record(workdir))
    open_manager = lambda: ocp.CheckpointManager(
        (workdir / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, create=True))
    with open_manager() as probe:
        check_same_run(workdir, saved, description, has_checkpoint=probe.latest_step() is not None)
    sync_processes("sleepjax_read_config")  # process 0 rewrites config.json below

    abstract = jax.eval_shape(lambda: init_train_state(model_cfg, cfg, make_optimizer(cfg)))  # any schedule: same tree
    state_sharding = train_state_shardings(abstract, model_cfg, mesh)
    target = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    abstract, state_sharding)
    manager, state, start = restore_newest_readable(open_manager, target, workdir, say)
    record = resolve_run_record(saved, description, start)
    if lead and record != saved:
        write_json(workdir / "config.json", record)
    schedule_steps = record["lr_schedule_steps"]
    step_settings = tuple((k, getattr(cfg, k)) for k in _STEP_FIELDS)
    declared = task.sleep_schedule(model_cfg.window)  # which windows sleep, as far as the task's layout fixes it
    warmup_eviction = model_cfg.eviction == "sliding" and cfg.warmup_eviction_steps > 0
    step_for = lambda step, schedule: _jitted_step(model_cfg, step_settings, schedule_steps, mesh,
                                                   warmup_eviction and step < cfg.warmup_eviction_steps, schedule)
    step_fn = step_for(cfg.steps, declared)
    if state is None and cfg.init_from:
        pretrained = finetune.pretrained_params(cfg.init_from, model_cfg, cfg.insert_gdn, cfg.seed)
        state = jax.jit(lambda p: init_train_state(model_cfg, cfg, make_optimizer(cfg, schedule_steps), p),
                        out_shardings=state_sharding)(pretrained)
        del pretrained
    elif state is None:
        # jit with out_shardings: every device initialises only its shard (same values on any mesh).
        state = jax.jit(lambda: init_train_state(model_cfg, cfg, make_optimizer(cfg, schedule_steps)),
                        out_shardings=state_sharding)()
    batch_sharding = sharding.batch_sharding(mesh)
    rows = sharding.local_rows(batch_sharding, (cfg.batch_size,))
    batch_abstract = {name: jax.ShapeDtypeStruct((cfg.batch_size, task.seq_len), dtype, sharding=batch_sharding)
                      for name, dtype in (("tokens", jnp.int32), ("loss_mask", jnp.bool_))}
    say(memory_summary(step_fn, state, batch_abstract, mesh, model_cfg, cfg))

    # A resumed run scores its first step again when that is an evaluation step (a preempted run skips the
    # evaluation it was due, so its grace period goes to the checkpoint); the log keeps one row per evaluation.
    eval_at_start = start > 0 and (start % cfg.eval_every == 0 or start == cfg.steps)
    log = MetricsLog(workdir, resume_step=start, enabled=log_enabled and lead, redo_eval=eval_at_start)
    if start:
        extending = saved is not None and cfg.steps > saved["train"]["steps"]
        log.line(f"resumed from the checkpoint at step {start} in {workdir}" +
                 (f"; extending the run from {saved['train']['steps']} to {cfg.steps} steps (learning rate: the "
                  f"schedule of its first {schedule_steps} steps, then that schedule's final rate)"
                  if extending else ""), final=True)

    eval_batches = task.eval_set(cfg.eval_seed, cfg.eval_size, cfg.eval_batch_size)
    replicated = sharding.replicated(mesh)
    put_replicated = (jnp.asarray if jax.process_count() == 1 else  # every process holds the whole eval batch
                      lambda x: jax.make_array_from_process_local_data(replicated, x, x.shape))
    tokens_per_seq = task.seq_len
    prefetch = Prefetcher(lambda step: task.batch(cfg.seed, step, cfg.batch_size, rows=rows))
    windows = WindowStore(workdir)
    saved_window = windows.load(start) if start else None
    window = Window(saved_window)
    # Timing carried across restarts (recorded with each checkpoint): results.json covers the whole run, not only
    # the last launch (a restart of a finished run must not replace its timing by a few seconds of restoring).
    timing = (saved_window or {}).get("timing", {})
    # Example-windows that should have slept and did, over the whole run (carried across restarts like timing).
    sleep_totals = {k: 0.0 for k in model_lib.SLEEP_COUNTS} | (saved_window or {}).get("sleep", {})
    warned: set[str] = set()

    def warn_once(key, text):
        if key not in warned:
            warned.add(key)
            log.line(f"WARNING: {text}", final=True)
    rate, t_run, steps_per_s = Throughput(timing.get("step_seconds", 0.0), timing.get("steps_timed", 0)), _now(), None
    wall_before = timing.get("wall_clock_s", 0.0)
    if start == cfg.steps and (workdir / "results.json").exists():  # finished: its own record also counts the end
        wall_before = max(wall_before, json.loads((workdir / "results.json").read_text()).get("wall_clock_s", 0.0))
    lr_at = learning_rates(cfg, schedule_steps)
    notice = PreemptionNotice()
    last_eval: dict = {}

    def run_eval(step):
        nonlocal last_eval
        last_eval = evaluate(state.params, eval_batches, num_items=task.num_items,
                             difficulty_name=task.difficulty_name, put=put_replicated, schedule=declared)
        if last_eval["slept_fraction"] < 1.0:
            warn_once("eval_slept", f"evaluation at step {step}: only {last_eval['slept_fraction']:.4f} of the "
                      "example-windows that should have slept did")
        log.write(step, "eval", {**last_eval, "sequences": step * cfg.batch_size,
                                 "tokens": step * cfg.batch_size * tokens_per_seq})
        log.line(f"eval @ {step}: exact {last_eval['exact']:.3f}  loss {last_eval['loss']:.4f}  "
                 f"slept {last_eval['slept_fraction']:.2f}  " +
                 "  ".join(f"{k.split('/')[1]}:{v:.2f}" for k, v in last_eval.items() if k.startswith("exact/")),
                 final=True)

    def save(step, force=False):
        if log.enabled:  # the partial averaging window at this step, so a resume here logs the same rows
            windows.save(step, {**window.state(), "timing": {
                "step_seconds": rate.total_seconds, "steps_timed": rate.total_steps,
                "wall_clock_s": wall_before + _now() - t_run}, "sleep": dict(sleep_totals)}, manager.all_steps())
        manager.save(step, args=ocp.args.StandardSave(state), force=force)

    try:
        if eval_at_start:
            run_eval(start)
        for step in range(start, cfg.steps):
            t0 = _now()  # step time: the batch, the step and the loss sync; never evaluation or checkpoints
            batch = prefetch.get(step)
            schedule, misfits = batch_schedule(declared, batch["loss_mask"], model_cfg.window)
            if schedule != declared:
                warn_once(f"schedule_{schedule}", f"the batch of step {step + 1} does not fit the task's sleep "
                          f"schedule {declared!r} ({'; '.join(misfits) or 'on another process'}): it runs as "
                          f"{schedule!r} (M: sleep decided per example, N passes for the batch), compiled once more")
            batch = sharding.global_batch(batch_sharding, {"tokens": batch["tokens"], "loss_mask": batch["loss_mask"]},
                                          cfg.batch_size)
            with jax.set_mesh(mesh):  # the model reads the mesh to run its kernels under shard_map
                state, metrics = step_for(step, schedule)(state, batch)
            loss = float(metrics["loss"])  # one host sync per step: a non-finite loss stops the run right here
            if step > start:  # the first step of a process includes compilation
                rate.add(_now() - t0)
            if not math.isfinite(loss):
                last = manager.latest_step()
                raise FloatingPointError(
                    f"loss is {loss} at step {step + 1}: stopping. " +
                    (f"The last good checkpoint (step {last}) is kept in {workdir / 'checkpoints'}" if last is not None
                     else "No checkpoint was saved before it: a new launch starts from step 0"))
            done = step + 1
            window.add(metrics)
            for key in model_lib.SLEEP_COUNTS:
                sleep_totals[key] += float(metrics[key])
            if done % cfg.log_every == 0 or done == cfg.steps:
                steps_per_s = rate.take()  # None for a window of only a process's first (compiling) step
                row = {**window.take(), **lr_at(done), "sequences": done * cfg.batch_size,
                       "tokens": done * cfg.batch_size * tokens_per_seq, "elapsed_s": _now() - t_run}
                row["slept_fraction"] = model_lib.slept_fraction(row)
                if row["slept_fraction"] < 1.0 or row["slept_supervised"] > 0:
                    warn_once("train_slept", f"steps up to {done}: only {row['slept_fraction']:.4f} of the "
                              f"example-windows that should have slept did, and {row['slept_supervised']:.1f} "
                              "supervised example-windows per step slept")
                if steps_per_s is not None:
                    row.update(steps_per_s=steps_per_s, tokens_per_s=steps_per_s * cfg.batch_size * tokens_per_seq)
                log.write(done, "train", row)
                eta = (cfg.steps - done) / steps_per_s if steps_per_s else float("nan")
                speed = f"{row['tokens_per_s'] / 1e3:.1f}k tok/s" if steps_per_s else "compiling"
                log.line(f"step {done}/{cfg.steps}  loss {row['loss']:.4f}  acc {row['accuracy']:.3f}  "
                         f"slept {row['slept_fraction']:.2f}  "
                         f"{speed}  ETA {format_duration(eta)}  (eval exact {last_eval.get('exact', float('nan')):.3f})")
            preempted = done < cfg.steps and notice.reached(done)  # asked at every step (the multi-process protocol)
            if preempted:
                save(done, force=True)
                manager.wait_until_finished()
                log.flush()
                error = Preempted(done, workdir / "checkpoints")
                log.line(error.message, final=True)
                raise error
            if done % cfg.eval_every == 0 or done == cfg.steps:
                run_eval(done)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:  # the final step always
                save(done)
    finally:
        notice.close()
        prefetch.close()
        manager.wait_until_finished()
        manager.close()
        log.close()

    results = {
        "task": task.name, "sleep_n": model_cfg.sleep_n, "seed": cfg.seed, "steps": int(state.step),
        "sequences": int(state.step) * cfg.batch_size, "tokens": int(state.step) * cfg.batch_size * tokens_per_seq,
        "num_params": model_lib.num_params(state.params), "difficulty_name": task.difficulty_name,
        "seconds_per_step": rate.seconds_per_step(), "wall_clock_s": wall_before + _now() - t_run, "final_eval": last_eval,
        "devices": jax.device_count(), "mesh": dict(mesh.shape),
        "lr_schedule_steps": schedule_steps, "extended": record["extended"],
        "sleep_schedule": declared, "slept_fraction": {"train": model_lib.slept_fraction(sleep_totals),
                                                       "eval": last_eval.get("slept_fraction")},
        "sleep_counts": {"train": sleep_totals},
    }
    if lead:
        write_json(workdir / "results.json", results)
    return results


def load_run(workdir: str | os.PathLike, step: int | None = None):
    """A finished or interrupted run: (params of its checkpoint (latest by default), ModelConfig, TrainConfig,
    task). Everything is rebuilt from the run's ``config.json``."""
    from sleepjax import tasks

    saved = json.loads((Path(workdir) / "config.json").read_text())
    model_cfg = ModelConfig(**saved["model"])
    cfg = TrainConfig(**saved["train"])
    task = tasks.get(saved["task"], **saved["task_options"])
    return load_params(workdir, model_cfg, cfg, step), model_cfg, cfg, task


def load_params(workdir: str | os.PathLike, model_cfg: ModelConfig, cfg: TrainConfig, step: int | None = None):
    """The parameters of a run's checkpoint (latest by default), replicated on this process's devices (whatever
    mesh or number of processes wrote it)."""
    tx = make_optimizer(cfg)
    replicated = sharding.replicated(sharding.make_mesh(""))
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                                      jax.eval_shape(lambda: init_train_state(model_cfg, cfg, tx)))
    with ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints") as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"no checkpoint in {workdir}")
        return manager.restore(step, args=ocp.args.StandardRestore(abstract)).params


