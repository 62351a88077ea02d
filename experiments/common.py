"""The part every launcher shares: flags -> (task, ModelConfig, TrainConfig) -> one run, or a sweep over N and
seeds with a comparison (``results.md``, ``accuracy.png``).

A launcher (``experiments/<task>.py``) defines only its presets and its task flags, then calls ``main``.
Flags left unset take the preset's value; flags given override it.
"""

from __future__ import annotations

import dataclasses
import json
import math
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
_PER_RUN = ("sleep_n", "seed", "workdir", "sweep_n", "seeds", "parallel", "baselines", "baseline", "compute_match_n",
            "eval_sleep_n")
BASELINES = ("transformer", "no_eviction", "compute_matched")

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
flags.DEFINE_integer("grad_accum", None, "Micro-batches per optimizer step: the batch is split into this many, "
                     "their gradients summed (the full batch's update for a fraction of its activation memory).",
                     lower_bound=1)
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
flags.DEFINE_enum("attn_backend", None, ["auto", "xla", "pallas", "cudnn"], "Window attention backend.")
flags.DEFINE_bool("distributed", False, "Multi-host: call jax.distributed.initialize() and let it detect the "
                  "cluster (TPU pod slices, SLURM, ...).")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 (implies --distributed).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's id (with --coordinator_address).")
flags.DEFINE_multi_string("model_set", [], "Override a ModelConfig field: --model_set=d_model=128 (repeatable).")
flags.DEFINE_enum("eviction", None, ["hard", "sliding"], "What attention keeps after a window is consolidated: "
                  "hard = nothing (Algorithm 1); sliding = its last L-1 tokens (paper section 6.4).")
flags.DEFINE_string("sleep_layers", None, "start:stop: the sleep passes loop only layers start..stop-1; the layers "
                    "before run once before them, the layers from stop once after (default: all layers loop).")
flags.DEFINE_list("baselines", None, "Extra runs beside the sweep, each a row of its report: transformer (attention "
                  "only, full context, no eviction), no_eviction (the same hybrid, full-context attention), "
                  "compute_matched (N = 1 trained for the layer passes (FLOPs) of each N > 1 of the sweep).")
flags.DEFINE_enum("baseline", "none", ["none", "transformer", "no_eviction"], "Train this one run as a baseline "
                  "(what --baselines runs): transformer or no_eviction.")
flags.DEFINE_integer("compute_match_n", None, "Train N = 1 for as many layer passes (FLOPs) as N = this would "
                     "take in --steps (more steps; what --baselines=compute_matched runs).", lower_bound=2)
flags.DEFINE_string("init_from", None, "Fine-tune a pretrained model: a local Hugging Face checkpoint directory "
                    "(Qwen3.5, Qwen3; see sleepjax/pretrained.py). The model is the checkpoint's (the preset's model "
                    "is ignored); window, N, eviction, sleep_layers, dtype and remat still apply. Text tasks use its "
                    "tokenizer.json.")
flags.DEFINE_integer("insert_gdn", None, "With --init_from: insert this many fresh GDN layers without an MLP, "
                     "evenly spaced (output projections start at zero: the model starts as the original).",
                     lower_bound=0)
flags.DEFINE_enum("freeze", None, ["none", "pretrained"], "pretrained: train only the inserted GDN layers (for "
                  "--freeze_steps steps, 0 = the whole run); everything loaded from --init_from stays put.")
flags.DEFINE_integer("freeze_steps", None, "Steps --freeze lasts (0: the whole run).", lower_bound=0)
flags.DEFINE_integer("warmup_eviction_steps", None, "With --eviction=sliding: train with hard eviction for this "
                     "many steps first (the paper calls that warm-up crucial for N > 1).", lower_bound=0)
flags.DEFINE_list("eval_sleep_n", None, "After training, evaluate every run's final checkpoint at each of these N "
                  "(e.g. 1,2,4,8), whatever N it was trained with: a table of accuracy per difficulty x N.")

_TRAIN_FLAGS = ("steps", "batch_size", "grad_accum", "eval_every", "eval_size", "checkpoint_every", "log_every",
                "optimizer", "muon_lr", "adam_lr", "warmup_steps", "lr_schedule", "weight_decay", "grad_clip", "mesh", "seed",
                "init_from", "insert_gdn", "freeze", "freeze_steps", "warmup_eviction_steps")
_MODEL_FLAGS = ("remat", "dtype", "ssm_rule", "gdn_backend", "attn_backend", "sleep_n", "eviction")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of a launcher call: its N and seed, and whether it is a baseline (see --baselines)."""

    sleep_n: int
    seed: int
    baseline: str = "none"  # "none", "transformer" or "no_eviction"
    compute_match_n: int | None = None  # N = 1 trained for the layer passes of N = this

    @property
    def name(self) -> str:
        """Directory name inside a sweep."""
        if self.baseline != "none":
            return f"{self.baseline}_seed{self.seed}"
        if self.compute_match_n:
            return f"N1_flopsN{self.compute_match_n}_seed{self.seed}"
        return f"N{self.sleep_n}_seed{self.seed}"

    @property
    def label(self) -> str:
        """Row label in reports."""
        if self.baseline == "transformer":
            return "transformer (attention only, full context)"
        if self.baseline == "no_eviction":
            return "hybrid, no eviction (full context)"
        if self.compute_match_n:
            return f"N = 1, compute-matched to N = {self.compute_match_n}"
        return f"N = {self.sleep_n}"

    @property
    def flags(self) -> list[str]:
        out = [f"--sleep_n={self.sleep_n}", f"--seed={self.seed}", f"--baseline={self.baseline}"]
        return out + ([f"--compute_match_n={self.compute_match_n}"] if self.compute_match_n else [])


def expand_runs() -> list[RunSpec]:
    """The runs the flags ask for: every N of --sweep_n (or --sleep_n) x every seed, then the --baselines."""
    sweep = [int(n) for n in FLAGS.sweep_n] if FLAGS.sweep_n else [FLAGS.sleep_n]
    seeds = [int(s) for s in FLAGS.seeds] if FLAGS.seeds else [FLAGS.seed]
    if any(n < 1 for n in sweep):
        raise app.UsageError(f"--sweep_n values must be >= 1, got {FLAGS.sweep_n}")
    unknown = sorted(set(FLAGS.baselines or []) - set(BASELINES))
    if unknown:
        raise app.UsageError(f"--baselines must be a list of {BASELINES}, got {unknown}")
    if FLAGS.baselines is None:
        return [RunSpec(n, s, FLAGS.baseline, FLAGS.compute_match_n) for n in sweep for s in seeds]
    runs = [RunSpec(n, s) for n in sweep for s in seeds]
    for name in FLAGS.baselines:
        if name == "compute_matched":
            if not any(n > 1 for n in sweep):
                raise app.UsageError("--baselines=compute_matched needs an N > 1 in --sweep_n (or --sleep_n)")
            runs += [RunSpec(1, s, compute_match_n=n) for n in sweep if n > 1 for s in seeds]
        else:
            runs += [RunSpec(1, s, baseline=name) for s in seeds]
    return runs


def _parse_sleep_layers(value: str | None):
    if value is None:
        return {}
    start, sep, stop = value.partition(":")
    try:
        return {"sleep_layers": (int(start), int(stop))} if sep else int("x")
    except ValueError:
        raise ValueError(f"--sleep_layers must be start:stop (e.g. 7:21), got {value!r}") from None


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


def build(task_name: str, presets: dict[str, Preset], task_flags: tuple[str, ...], run: RunSpec):
    """(task, ModelConfig, TrainConfig) for one run: preset values, then every flag that was given, then what the
    run's baseline changes (full-context window, attention-only layers, compute-matched steps)."""
    from sleepjax import tasks
    from sleepjax.config import ModelConfig
    from sleepjax.train import TrainConfig

    preset = presets[FLAGS.config]
    task_options = {**preset.task, **{k: getattr(FLAGS, k) for k in task_flags if getattr(FLAGS, k) is not None}}
    if FLAGS.init_from and "tokenizer" in task_flags and FLAGS.tokenizer is None:
        task_options["tokenizer"] = FLAGS.init_from  # a text task speaks the pretrained model's tokens
    task = tasks.get(task_name, **task_options)
    train_fields = {**preset.train, **{k: getattr(FLAGS, k) for k in _TRAIN_FLAGS
                                       if getattr(FLAGS, k) is not None and FLAGS[k].present}}
    train_fields["seed"] = run.seed
    model_fields = {k: getattr(FLAGS, k) for k in _MODEL_FLAGS if getattr(FLAGS, k) is not None}
    model_fields["sleep_n"] = run.sleep_n
    overrides = {"window": task.window, **model_fields, **_parse_sleep_layers(FLAGS.sleep_layers),
                 **_parse_model_set(FLAGS.model_set)}
    if FLAGS.init_from:
        from sleepjax import pretrained

        policy = {k: v for k, v in preset.model_overrides.items() if k in ("eviction", "sleep_layers", "remat")}
        model_cfg = pretrained.load_config(FLAGS.init_from, insert_gdn=FLAGS.insert_gdn or 0, **policy, **overrides)
    else:
        model_cfg = ModelConfig.preset(preset.model, **{**preset.model_overrides, "vocab_size": task.vocab_size,
                                                        **overrides})
    if run.baseline != "none":  # one window holds the whole sequence: nothing is ever evicted or slept over
        model_cfg = model_cfg.replace(window=task.seq_len, sleep_n=1, sleep_layers=None)
        if run.baseline == "transformer":
            model_cfg = model_cfg.replace(layers=("attn",) * len(model_cfg.layers), mlp_free_layers=())
    if run.compute_match_n:
        from sleepjax.model import layer_passes

        mask, schedule = task.batch(run.seed, 0, 8)["loss_mask"], task.sleep_schedule(model_cfg.window)
        ratio = (layer_passes(model_cfg.replace(sleep_n=run.compute_match_n), mask, schedule)
                 / layer_passes(model_cfg, mask, schedule))
        train_fields["steps"] = math.ceil(train_fields.get("steps", TrainConfig.steps) * ratio)
    return task, model_cfg, TrainConfig(**train_fields)


_COMMON_FLAGS = ("config",) + _TRAIN_FLAGS + _MODEL_FLAGS + ("model_set", "sleep_layers")


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


def _child_command(module: str, task_flags: tuple[str, ...], run: RunSpec, workdir: Path) -> list[str]:
    """The launcher's own command line for one run of a sweep: every flag given, per-run flags replaced."""
    # A repeatable flag (--model_set) serialises to one line per value: each must be an argument of its own.
    given = [arg for name in _COMMON_FLAGS + task_flags if FLAGS[name].present and name not in _PER_RUN
             for arg in FLAGS[name].serialize().split("\n")]
    return [sys.executable, "-m", module, *given, *run.flags, f"--workdir={workdir}"]


def _run_parallel(module: str, task_flags: tuple[str, ...], runs: list[tuple[RunSpec, Path]],
                  parallel: int) -> None:
    """Trains the runs in child processes, ``parallel`` at a time, each on one CPU thread; logs to run/log.txt."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_cpu_multi_thread_eigen=false").strip()
    # Longest runs (largest N) first, so the last runs to finish are short ones.
    pending, active, failed = sorted(runs, key=lambda r: -max(r[0].sleep_n, r[0].compute_match_n or 0)), [], []
    last_report = 0.0
    while pending or active:
        while pending and len(active) < parallel:
            run, run_dir = pending.pop(0)
            log = (run_dir / "log.txt").open("a")
            proc = subprocess.Popen(_child_command(module, task_flags, run, run_dir), stdout=log,
                                    stderr=subprocess.STDOUT, env=env)
            active.append((proc, log, run, run_dir))
            print(f"started {run.label}, seed {run.seed} -> {run_dir}/log.txt", flush=True)
        time.sleep(2.0)
        for entry in list(active):
            proc, log, run, run_dir = entry
            if proc.poll() is not None:
                log.close()
                active.remove(entry)
                status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                print(f"{run.label}, seed {run.seed}: {status}", flush=True)
                if proc.returncode:
                    failed.append(run_dir)
        if time.time() - last_report > 60 and active:
            last_report = time.time()
            for _, _, run, run_dir in active:
                lines = [l for l in (run_dir / "log.txt").read_text().splitlines() if l.startswith("step")]
                print(f"  {run.label}, seed {run.seed}: {lines[-1] if lines else 'compiling...'}", flush=True)
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

    several = bool(FLAGS.sweep_n or FLAGS.seeds or FLAGS.baselines)
    runs = expand_runs()
    single_name = (f"_N{FLAGS.sleep_n}" if runs[0].baseline == "none" and not runs[0].compute_match_n
                   else f"_{runs[0].name.rsplit('_seed', 1)[0]}")
    workdir = Path(FLAGS.workdir or f"runs/{task_name}/{FLAGS.config}" + ("" if several else single_name))
    eval_ns = [int(n) for n in FLAGS.eval_sleep_n] if FLAGS.eval_sleep_n else []
    try:
        if any(n < 1 for n in eval_ns):
            raise ValueError(f"--eval_sleep_n values must be >= 1, got {FLAGS.eval_sleep_n}")
        sharding.parse_mesh(FLAGS.mesh)
        check_workdir(workdir)
        built = {run: build(task_name, presets, task_flags, run) for run in runs}  # validates everything
    except ValueError as e:
        raise app.UsageError(str(e)) from None

    if not several:
        task, model_cfg, train_cfg = built[runs[0]]
        (workdir / report.LABEL_FILE).write_text(runs[0].label + "\n")
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
        if eval_ns:
            print(report.eval_sleep_n_table([_evaluate_at_n(workdir, eval_ns)]))
        return

    run_dirs = {run: workdir / run.name for run in runs}
    for run, run_dir in run_dirs.items():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / report.LABEL_FILE).write_text(run.label + "\n")
    print(f"{task_name} sweep: {len(runs)} runs ({', '.join(sorted({r.label for r in runs}))}; seeds "
          f"{sorted({r.seed for r in runs})}), {FLAGS.parallel} at a time -> {workdir}", flush=True)
    if FLAGS.parallel > 1:
        _run_parallel(module, task_flags, list(run_dirs.items()), FLAGS.parallel)
    else:
        for run in runs:
            print(f"--- {run.label}, seed = {run.seed} ---", flush=True)
            train(*built[run], run_dirs[run])
    if eval_ns:
        for run in runs:
            if run.baseline == "none":
                _evaluate_at_n(run_dirs[run], eval_ns)
    text = report.write_comparison(workdir, [run_dirs[r] for r in runs],
                                   title=f"{task_name} ({FLAGS.config}): sleep passes N")
    print(text)
    print(f"wrote {workdir / 'results.md'} and {workdir / 'accuracy.png'}")


def _evaluate_at_n(run_dir: Path, ns: list[int]) -> dict:
    """The run's final checkpoint on its held-out set at every N in ``ns``; written to eval_sleep_n.json."""
    from sleepjax import report
    from sleepjax.evaluate import evaluate_at_sleep_n
    from sleepjax.train import load_run

    params, model_cfg, train_cfg, task = load_run(run_dir)
    batches = task.eval_set(train_cfg.eval_seed, train_cfg.eval_size, train_cfg.eval_batch_size)
    result = {"label": report.run_label(run_dir, model_cfg.sleep_n), "seed": train_cfg.seed,
              "trained_n": model_cfg.sleep_n,
              "by_n": {str(n): metrics for n, metrics in evaluate_at_sleep_n(
                  params, batches, ns, num_items=task.num_items, difficulty_name=task.difficulty_name).items()}}
    (run_dir / report.EVAL_SLEEP_N_FILE).write_text(json.dumps(result, indent=2))
    return result


def define_config_flag(presets: dict[str, Preset], default: str) -> None:
    flags.DEFINE_enum("config", default, list(presets),
                      "Experiment preset: " + "; ".join(f"{k}: {p.description}" for k, p in presets.items()))
