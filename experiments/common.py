"""The part every launcher shares: flags -> (task, ModelConfig, TrainConfig) -> one run, or a sweep over N and
seeds with a comparison (``results.md``, ``accuracy.png``).

A launcher (``experiments/<task>.py``) defines only its presets and its task flags, then calls ``main``.
Flags left unset take the preset's value; flags given override it.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from absl import app, flags

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Preset:
    """One ``--config`` choice: a ModelConfig preset (plus field overrides), task options, TrainConfig fields."""

    model: str
    task: dict[str, Any]
    train: dict[str, Any]
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    description: str = ""


# Flags that name one run inside a sweep: the sweep sets them itself for every child run.
_PER_RUN = ("sleep_n", "seed", "workdir", "sweep_n", "seeds", "parallel")

flags.DEFINE_integer("sleep_n", 1, "N: passes over every consolidation window (1 = no extra sleep).", lower_bound=1)
flags.DEFINE_list("sweep_n", None, "Train one model per N (e.g. 1,2,4), same data and seed, then compare.")
flags.DEFINE_list("seeds", None, "Train one model per seed (with --sweep_n: every N x every seed).")
flags.DEFINE_integer("parallel", 1, "Sweep runs trained at once, one process each (CPU: 2 on 2 cores).",
                     lower_bound=1)
flags.DEFINE_string("workdir", None, "Output directory (checkpoints, metrics.jsonl, tb/, results). Starting "
                    "again with the same workdir resumes. Default: runs/<task>/<config>[_N<n>].")
flags.DEFINE_string("mesh", "", "Device mesh, e.g. data:8 or data:2,fsdp:2,tensor:2 (default: all devices on data).")
flags.DEFINE_integer("seed", 0, "Seed of the parameters and of the training data.")
flags.DEFINE_integer("steps", None, "Optimizer steps. A larger value with the workdir of a finished or "
                     "interrupted run extends it from its last checkpoint: the learning-rate schedule stays the one "
                     "of the run's first --steps and the added steps train at its final rate (recorded in "
                     "config.json and results.json).", lower_bound=1)
flags.DEFINE_integer("batch_size", None, "Global batch size (sequences per step).", lower_bound=1)
flags.DEFINE_integer("eval_every", None, "Evaluate on the held-out set every this many steps.", lower_bound=1)
flags.DEFINE_integer("eval_size", None, "Held-out examples.", lower_bound=1)
flags.DEFINE_integer("checkpoint_every", None, "Checkpoint every this many steps.", lower_bound=1)
flags.DEFINE_integer("log_every", None, "Progress line and metrics.jsonl row every this many steps.", lower_bound=1)
flags.DEFINE_enum("optimizer", None, ["muon", "adamw"], "Muon on hidden matrices + AdamW, or AdamW only.")
flags.DEFINE_float("muon_lr", None, "Muon peak learning rate.")
flags.DEFINE_float("adam_lr", None, "AdamW peak learning rate.")
flags.DEFINE_integer("warmup_steps", None, "Linear warmup steps.", lower_bound=0)
flags.DEFINE_enum("lr_schedule", None, ["cosine", "constant"], "Learning-rate schedule after warmup.")
flags.DEFINE_float("weight_decay", None, "Decoupled weight decay.")
flags.DEFINE_float("grad_clip", None, "Global-norm gradient clipping (0 = off).")
flags.DEFINE_enum("remat", None, ["none", "pass", "window", "both"], "Activation checkpointing policy.")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Activation dtype (fast weights stay float32).")
flags.DEFINE_enum("ssm_rule", None, ["delta", "hebbian"], "Fast-weight update rule.")
flags.DEFINE_enum("gdn_backend", None, ["auto", "xla", "recurrent", "chunked", "pallas"], "Gated delta rule backend.")
flags.DEFINE_enum("attn_backend", None, ["auto", "xla", "pallas"], "Window attention backend.")
flags.DEFINE_bool("distributed", False, "Multi-host: call jax.distributed.initialize() and let it detect the "
                  "cluster (TPU pod slices, SLURM, ...).")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 (implies --distributed).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's id (with --coordinator_address).")
flags.DEFINE_multi_string("model_set", [], "Override a ModelConfig field: --model_set=d_model=128 (repeatable).")

_TRAIN_FLAGS = ("steps", "batch_size", "eval_every", "eval_size", "checkpoint_every", "log_every", "optimizer",
                "muon_lr", "adam_lr", "warmup_steps", "lr_schedule", "weight_decay", "grad_clip", "mesh", "seed")
_MODEL_FLAGS = ("remat", "dtype", "ssm_rule", "gdn_backend", "attn_backend", "sleep_n")


def _parse_model_set(entries: list[str]) -> dict[str, Any]:
    from sleepjax.config import ModelConfig

    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    out = {}
    for entry in entries:
        name, _, value = entry.partition("=")
        if name not in fields or not value:
            raise ValueError(f"--model_set must be field=value with field in {sorted(fields)}, got {entry!r}")
        default = getattr(ModelConfig(), name)
        if isinstance(default, tuple):
            out[name] = tuple(v.strip() for v in value.split(","))
        elif isinstance(default, bool):
            out[name] = value.lower() in ("1", "true", "yes")
        else:
            try:
                out[name] = type(default)(value)
            except ValueError:
                raise ValueError(f"--model_set={entry}: {name} must be a {type(default).__name__}") from None
    return out


def build(task_name: str, presets: dict[str, Preset], task_flags: tuple[str, ...], sleep_n: int, seed: int):
    """(task, ModelConfig, TrainConfig) for one run: preset values, then every flag that was given."""
    from sleepjax import tasks
    from sleepjax.config import ModelConfig
    from sleepjax.train import TrainConfig

    preset = presets[FLAGS.config]
    task_options = {**preset.task, **{k: getattr(FLAGS, k) for k in task_flags if getattr(FLAGS, k) is not None}}
    task = tasks.get(task_name, **task_options)
    train_fields = {**preset.train, **{k: getattr(FLAGS, k) for k in _TRAIN_FLAGS
                                       if getattr(FLAGS, k) is not None and FLAGS[k].present}}
    train_fields["seed"] = seed
    train_cfg = TrainConfig(**train_fields)
    model_fields = {k: getattr(FLAGS, k) for k in _MODEL_FLAGS if getattr(FLAGS, k) is not None}
    model_fields["sleep_n"] = sleep_n
    model_cfg = ModelConfig.preset(preset.model, **{**preset.model_overrides, "vocab_size": task.vocab_size,
                                                    "window": task.window, **model_fields,
                                                    **_parse_model_set(FLAGS.model_set)})
    return task, model_cfg, train_cfg


_COMMON_FLAGS = ("config",) + _TRAIN_FLAGS + _MODEL_FLAGS + ("model_set",)


def init_distributed() -> None:
    """jax.distributed from flags (an explicit coordinator) or from the environment (--distributed). Must run
    before anything asks JAX about devices."""
    import jax

    explicit = FLAGS.coordinator_address is not None
    if not (explicit or FLAGS.distributed):
        return
    if explicit and (FLAGS.num_processes is None or FLAGS.process_id is None):
        raise app.UsageError("--coordinator_address needs --num_processes and --process_id")
    if explicit and not 0 <= FLAGS.process_id < FLAGS.num_processes:
        raise app.UsageError(f"--process_id must lie in [0, --num_processes={FLAGS.num_processes}), "
                             f"got {FLAGS.process_id}")
    # Collectives between the CPU devices of different processes go over gloo (affects only the CPU backend).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    else:
        jax.distributed.initialize()


def _child_command(module: str, task_flags: tuple[str, ...], sleep_n: int, seed: int, workdir: Path) -> list[str]:
    """The launcher's own command line for one run of a sweep: every flag given, per-run flags replaced."""
    given = [FLAGS[name].serialize() for name in _COMMON_FLAGS + task_flags
             if FLAGS[name].present and name not in _PER_RUN]
    return [sys.executable, "-m", module, *given, f"--sleep_n={sleep_n}", f"--seed={seed}", f"--workdir={workdir}"]


def _run_parallel(module: str, task_flags: tuple[str, ...], runs: list[tuple[int, int, Path]],
                  parallel: int) -> None:
    """Trains the runs in child processes, ``parallel`` at a time, each on one CPU thread; logs to run/log.txt."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_cpu_multi_thread_eigen=false").strip()
    # Longest runs (largest N) first, so the last runs to finish are short ones.
    pending, active, failed = sorted(runs, key=lambda r: -r[0]), [], []
    last_report = 0.0
    while pending or active:
        while pending and len(active) < parallel:
            n, seed, run_dir = pending.pop(0)
            run_dir.mkdir(parents=True, exist_ok=True)
            log = (run_dir / "log.txt").open("a")
            proc = subprocess.Popen(_child_command(module, task_flags, n, seed, run_dir), stdout=log,
                                    stderr=subprocess.STDOUT, env=env)
            active.append((proc, log, n, seed, run_dir))
            print(f"started N={n} seed={seed} -> {run_dir}/log.txt", flush=True)
        time.sleep(2.0)
        for entry in list(active):
            proc, log, n, seed, run_dir = entry
            if proc.poll() is not None:
                log.close()
                active.remove(entry)
                status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                print(f"N={n} seed={seed}: {status}", flush=True)
                if proc.returncode:
                    failed.append(run_dir)
        if time.time() - last_report > 60 and active:
            last_report = time.time()
            for _, _, n, seed, run_dir in active:
                lines = [l for l in (run_dir / "log.txt").read_text().splitlines() if l.startswith("step")]
                print(f"  N={n} seed={seed}: {lines[-1] if lines else 'compiling...'}", flush=True)
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed; see log.txt in: " + ", ".join(map(str, failed)))


def main(task_name: str, presets: dict[str, Preset], task_flags: tuple[str, ...], module: str) -> None:
    """Runs the launcher. ``task_flags``: the launcher's flags that are task options of the same name (None =
    the preset's value); ``module``: the launcher's module, re-run by parallel sweeps."""
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO; the progress line says enough
    init_distributed()
    from sleepjax import report, sharding
    from sleepjax.train import check_workdir, train

    sweep = [int(n) for n in FLAGS.sweep_n] if FLAGS.sweep_n else None
    seeds = [int(s) for s in FLAGS.seeds] if FLAGS.seeds else None
    if sweep is not None and any(n < 1 for n in sweep):
        raise app.UsageError(f"--sweep_n values must be >= 1, got {FLAGS.sweep_n}")
    workdir = Path(FLAGS.workdir or f"runs/{task_name}/{FLAGS.config}" +
                   ("" if sweep or seeds else f"_N{FLAGS.sleep_n}"))
    runs = [(n, s) for n in (sweep or [FLAGS.sleep_n]) for s in (seeds or [FLAGS.seed])]
    try:
        sharding.parse_mesh(FLAGS.mesh)
        check_workdir(workdir)
        built = {(n, s): build(task_name, presets, task_flags, n, s) for n, s in runs}  # validates everything
    except ValueError as e:
        raise app.UsageError(str(e)) from None

    if len(runs) == 1 and not sweep and not seeds:
        task, model_cfg, train_cfg = built[runs[0]]
        print(f"{task_name}: {presets[FLAGS.config].description or FLAGS.config}; N = {model_cfg.sleep_n}; "
              f"workdir {workdir}", flush=True)
        from sleepjax.train import Preempted, UnreadableCheckpoints

        try:
            train(task, model_cfg, train_cfg, workdir)
        except FloatingPointError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(3)
        except UnreadableCheckpoints as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        except Preempted as e:  # checkpoint saved and said so; exit 75 (EX_TEMPFAIL): run the same command again
            sys.exit(e.code)
        return

    run_dirs = {(n, s): workdir / f"N{n}_seed{s}" for n, s in runs}
    print(f"{task_name} sweep: N in {sorted({n for n, _ in runs})}, seeds {sorted({s for _, s in runs})}, "
          f"{len(runs)} runs, {FLAGS.parallel} at a time -> {workdir}", flush=True)
    if FLAGS.parallel > 1:
        _run_parallel(module, task_flags, [(n, s, run_dirs[(n, s)]) for n, s in runs], FLAGS.parallel)
    else:
        for key in runs:
            task, model_cfg, train_cfg = built[key]
            print(f"--- N = {key[0]}, seed = {key[1]} ---", flush=True)
            train(task, model_cfg, train_cfg, run_dirs[key])
    text = report.write_comparison(workdir, [run_dirs[k] for k in runs],
                                   title=f"{task_name} ({FLAGS.config}): sleep passes N")
    print(text)
    print(f"wrote {workdir / 'results.md'} and {workdir / 'accuracy.png'}")


def define_config_flag(presets: dict[str, Preset], default: str) -> None:
    flags.DEFINE_enum("config", default, list(presets),
                      "Experiment preset: " + "; ".join(f"{k}: {p.description}" for k, p in presets.items()))
