"""The part every launcher shares: a config -> (task, ModelConfig, TrainConfig) -> one run, or a sweep over N and
seeds with a comparison (``results.md``, ``accuracy.png``).

One way to configure a run: ``--config`` names a preset of the launcher's config file (``--config=paper``, from
``experiments/configs/<task>.py``) or any config file (``--config=path/to/file.py:paper``), and
``--config.<section>.<field>=VALUE`` overrides any field of it (sections model, train, task; see
``experiments/configs/common.py``). The flags defined here say only which runs to train and where.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from experiments.configs import common as config_common

FLAGS = flags.FLAGS
BASELINES = ("transformer", "no_eviction", "compute_matched")

flags.DEFINE_integer("sleep_n", None, "N: passes over every consolidation window (1 = no extra sleep). Default: "
                     "config.model.sleep_n.", lower_bound=1)
flags.DEFINE_list("sweep_n", None, "Train one model per N (e.g. 1,2,4), same data and seed, then compare.")
flags.DEFINE_list("seeds", None, "Train one model per seed (with --sweep_n: every N x every seed). Default: "
                  "config.train.seed.")
flags.DEFINE_integer("parallel", 1, "Sweep runs trained at once, one process each (CPU: 2 on 2 cores).",
                     lower_bound=1)
flags.DEFINE_string("workdir", None, "Output directory (checkpoints, metrics.jsonl, tb/, results). Starting "
                    "again with the same workdir resumes. Default: runs/<task>/<preset>[_N<n>].")
flags.DEFINE_list("baselines", None, "Extra runs beside the sweep, each a row of its report: transformer (attention "
                  "only, full context, no eviction), no_eviction (the same hybrid, full-context attention), "
                  "compute_matched (N = 1 trained for the layer passes (FLOPs) of each N > 1 of the sweep).")
flags.DEFINE_enum("baseline", "none", ["none", "transformer", "no_eviction"], "Train this one run as a baseline "
                  "(what --baselines runs): transformer or no_eviction.")
flags.DEFINE_integer("compute_match_n", None, "Train N = 1 for as many layer passes (FLOPs) as N = this would "
                     "take in config.train.steps (more steps; what --baselines=compute_matched runs).", lower_bound=2)
flags.DEFINE_list("eval_sleep_n", None, "After training, evaluate every run's final checkpoint at each of these N "
                  "(e.g. 1,2,4,8), whatever N it was trained with: a table of accuracy per difficulty x N.")
flags.DEFINE_bool("distributed", False, "Multi-host: call jax.distributed.initialize() and let it detect the "
                  "cluster (TPU pod slices, SLURM, ...).")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 (implies --distributed).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's id (with --coordinator_address).")

# What a sweep never passes on to its children: the flags that name one run (it sets them for each child) and
# the multi-host ones (a child of a parallel sweep is one local process).
_NOT_FOR_CHILDREN = ("sleep_n", "workdir", "sweep_n", "seeds", "parallel", "baselines", "baseline",
                     "compute_match_n", "eval_sleep_n", "config.train.seed", "config.model.sleep_n", "distributed",
                     "coordinator_address", "num_processes", "process_id")
_HELP = ("-h", "-help", "--help", "--helpshort", "-?")
# With config.train.init_from the model is the checkpoint's; these fields of config.model still apply (how it
# sleeps and runs, not what it is). None keeps the checkpoint's.
_PRETRAINED_POLICY = ("window", "sleep_n", "eviction", "sleep_layers", "dtype", "remat", "gdn_backend",
                      "attn_backend")
_ARGS: list[str] = []  # the command line as given (a parallel sweep passes it on to its children)


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
        out = [f"--sleep_n={self.sleep_n}", f"--config.train.seed={self.seed}", f"--baseline={self.baseline}"]
        return out + ([f"--compute_match_n={self.compute_match_n}"] if self.compute_match_n else [])


def expand_runs(config) -> list[RunSpec]:
    """The runs the flags ask for: every N of --sweep_n (or --sleep_n) x every seed, then the --baselines."""
    sweep = [int(n) for n in FLAGS.sweep_n] if FLAGS.sweep_n else [FLAGS.sleep_n or config.model.sleep_n]
    seeds = [int(s) for s in FLAGS.seeds] if FLAGS.seeds else [config.train.seed]
    if any(n < 1 for n in sweep):
        raise ValueError(f"--sweep_n values must be >= 1, got {FLAGS.sweep_n}")
    unknown = sorted(set(FLAGS.baselines or []) - set(BASELINES))
    if unknown:
        raise ValueError(f"--baselines must be a list of {BASELINES}, got {unknown}")
    if FLAGS.baselines is None:
        return [RunSpec(n, s, FLAGS.baseline, FLAGS.compute_match_n) for n in sweep for s in seeds]
    runs = [RunSpec(n, s) for n in sweep for s in seeds]
    for name in FLAGS.baselines:
        if name == "compute_matched":
            if not any(n > 1 for n in sweep):
                raise ValueError("--baselines=compute_matched needs an N > 1 in --sweep_n (or --sleep_n)")
            runs += [RunSpec(1, s, compute_match_n=n) for n in sweep if n > 1 for s in seeds]
        else:
            runs += [RunSpec(1, s, baseline=name) for s in seeds]
    return runs


def _validated(section: str, make):
    """``make()``, its ValueError prefixed with the config section it comes from."""
    try:
        return make()
    except ValueError as e:
        raise ValueError(f"config.{section}: {e}") from None


def build(task_name: str, config, run: RunSpec):
    """(task, ModelConfig, TrainConfig) for one run: the config's sections with the run's N and seed, then what the
    run's baseline changes (full-context window, attention-only layers, compute-matched steps)."""
    from sleepjax import tasks
    from sleepjax.config import ModelConfig
    from sleepjax.train import TrainConfig

    init_from = config.train.init_from
    if init_from.startswith(config_common.REQUIRED):
        raise ValueError(f"config.train.init_from: this preset fine-tunes a pretrained model; give "
                         f"--config.train.init_from=DIR ({init_from[len(config_common.REQUIRED):]})")
    options = config.task.to_dict()
    if init_from and "tokenizer" in options and options["tokenizer"] is None:
        options["tokenizer"] = init_from  # a text task speaks the pretrained model's tokens
    task = _validated("task", lambda: tasks.get(task_name, **options))
    fields = {**config.model.to_dict(), "sleep_n": run.sleep_n}
    for name in ("vocab_size", "window"):  # None: the task's
        fields[name] = getattr(task, name) if fields[name] is None else fields[name]
    if init_from:
        from sleepjax import pretrained

        policy = {k: fields[k] for k in _PRETRAINED_POLICY if fields[k] is not None}
        model_cfg = _validated("model", lambda: pretrained.load_config(
            init_from, insert_gdn=config.train.insert_gdn, insert_kind=config.train.insert_kind, **policy))
    else:
        model_cfg = _validated("model", lambda: ModelConfig(**fields))
    if run.baseline != "none":  # one window holds the whole sequence: nothing is ever evicted or slept over
        model_cfg = model_cfg.replace(window=task.seq_len, sleep_n=1, sleep_layers=None)
        if run.baseline == "transformer":
            model_cfg = model_cfg.replace(layers=("attn",) * len(model_cfg.layers), mlp_free_layers=())
    train_fields = {**config.train.to_dict(), "seed": run.seed}
    if run.compute_match_n:
        from sleepjax.model import layer_passes

        mask, schedule = task.batch(run.seed, 0, 8)["loss_mask"], task.sleep_schedule(model_cfg.window)
        ratio = (layer_passes(model_cfg.replace(sleep_n=run.compute_match_n), mask, schedule)
                 / layer_passes(model_cfg, mask, schedule))
        train_fields["steps"] = math.ceil(train_fields["steps"] * ratio)
        train_fields["epochs"] *= ratio  # a run counted in epochs: its steps come from them
    return task, model_cfg, _validated("train", lambda: TrainConfig(**train_fields))


def init_distributed() -> None:
    """jax.distributed from flags (an explicit coordinator) or from the environment (--distributed). Must run
    before anything asks JAX about devices."""
    import jax

    explicit = FLAGS.coordinator_address is not None
    if not (explicit or FLAGS.distributed):
        return
    if explicit and (FLAGS.num_processes is None or FLAGS.process_id is None):
        raise ValueError("--coordinator_address needs --num_processes and --process_id")
    if explicit and not 0 <= FLAGS.process_id < FLAGS.num_processes:
        raise ValueError(f"--process_id must lie in [0, --num_processes={FLAGS.num_processes}), "
                         f"got {FLAGS.process_id}")
    # Collectives between the CPU devices of different processes go over gloo (affects only the CPU backend).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    else:
        jax.distributed.initialize()


def _for_children(args: list[str]) -> list[str]:
    """``args`` less the flags in _NOT_FOR_CHILDREN (and the value of one given as ``--flag VALUE``)."""
    out, skip_value = [], False
    for arg in args:
        if skip_value:
            skip_value = False
            continue
        name = arg.lstrip("-").split("=", 1)[0]
        if arg.startswith("-") and (name in _NOT_FOR_CHILDREN or name == "nodistributed"):
            skip_value = "=" not in arg and name not in ("distributed", "nodistributed")
            continue
        out.append(arg)
    return out


def _child_command(module: str, run: RunSpec, workdir: Path) -> list[str]:
    """The launcher's own command line for one run of a sweep: the arguments it was given (the config and every
    override), its per-run flags replaced by the run's."""
    return [sys.executable, "-m", module, *_for_children(_ARGS), *run.flags, f"--workdir={workdir}"]


def _run_parallel(module: str, runs: list[tuple[RunSpec, Path]], parallel: int) -> None:
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
            proc = subprocess.Popen(_child_command(module, run, run_dir), stdout=log, stderr=subprocess.STDOUT,
                                    env=env)
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


def _usage_error(error: Exception):
    """A bad setting, found before any work: one line naming it, exit 1."""
    print("usage error: " + " ".join(str(error).split()), file=sys.stderr)
    sys.exit(1)


def _preset_name() -> str:
    """``paper`` for --config=paper or --config=FILE.py:paper (the file's name for a file without a preset)."""
    path, _, preset = FLAGS["config"].config_filename.partition(":")
    return preset or Path(path).stem


def main(task_name: str) -> None:
    """Trains what the flags ask for (after ``run`` parsed them)."""
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO; the progress line says enough
    try:
        config = FLAGS.config
        runs = expand_runs(config)
        init_distributed()
        from sleepjax import mesh as mesh_lib, report
        from sleepjax.train import check_workdir

        several = bool(FLAGS.sweep_n or FLAGS.seeds or FLAGS.baselines)
        single_name = (f"_N{runs[0].sleep_n}" if runs[0].baseline == "none" and not runs[0].compute_match_n
                       else f"_{runs[0].name.rsplit('_seed', 1)[0]}")
        workdir = Path(FLAGS.workdir or f"runs/{task_name}/{_preset_name()}" + ("" if several else single_name))
        eval_ns = [int(n) for n in FLAGS.eval_sleep_n] if FLAGS.eval_sleep_n else []
        if any(n < 1 for n in eval_ns):
            raise ValueError(f"--eval_sleep_n values must be >= 1, got {FLAGS.eval_sleep_n}")
        _validated("train", lambda: mesh_lib.parse_mesh(config.train.mesh))
        check_workdir(workdir)
        built = {run: build(task_name, config, run) for run in runs}  # validates everything
    except (ValueError, OSError) as e:  # OSError: a file a setting names (a tokenizer, a checkpoint) is missing
        _usage_error(e)
    from sleepjax.train import train

    if not several:
        task, model_cfg, train_cfg = built[runs[0]]
        (workdir / report.LABEL_FILE).write_text(runs[0].label + "\n")
        print(f"{task_name}: {_preset_name()}; N = {model_cfg.sleep_n}; workdir {workdir}", flush=True)
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
        _run_parallel(f"experiments.{task_name}", list(run_dirs.items()), FLAGS.parallel)
    else:
        for run in runs:
            print(f"--- {run.label}, seed = {run.seed} ---", flush=True)
            train(*built[run], run_dirs[run])
    if eval_ns:
        for run in runs:
            if run.baseline == "none":
                _evaluate_at_n(run_dirs[run], eval_ns)
    text = report.write_comparison(workdir, [run_dirs[r] for r in runs],
                                   title=f"{task_name} ({_preset_name()}): sleep passes N")
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


# ----- the command line: --config, overrides, removed flags, --help


def _configs(task_name: str):
    """The launcher's own config file, experiments/configs/<task_name>.py."""
    return importlib.import_module(f"experiments.configs.{task_name}")


def _expand_config(configs, args: list[str]) -> list[str]:
    """``--config=NAME`` (no .py) -> ``--config=<the launcher's config file>:NAME``; a path is left as it is."""
    out = []
    for arg in args:
        if out and out[-1] in ("--config", "-config"):  # --config NAME
            arg = f"--config={arg}"
            out.pop()
        name = arg.split("=", 1)[1] if re.match(r"--?config=", arg) else None
        if name is not None and ".py" not in name:
            if name not in configs.PRESETS:
                raise flags.Error(f"--config must be a preset of {configs.__file__} ({', '.join(configs.PRESETS)}) "
                                  f"or FILE.py:PRESET, got {name!r}")
            arg = f"--config={configs.__file__}:{name}"
        out.append(arg)
    return out


def _refuse_removed_flags(configs, args: list[str]) -> None:
    """The flags that mirrored config fields are gone: one of them is an error naming its replacement."""
    sections = configs.get_config()  # every preset has the same fields
    for arg in args:
        match = re.fullmatch(r"--?(\w+)(?:=(.*))?", arg, re.S)
        if not match or match[1] in FLAGS:
            continue
        name, value = match[1], match[2]
        if name == "model_set" and value and "=" in value:  # --model_set=d_model=128
            name, value = value.split("=", 1)
        section = next((s for s in ("task", "train", "model") if name in sections[s]), None)
        if section is None:
            continue  # absl says it is unknown
        if value is None:
            value = "VALUE"
        elif sections[section].get_type(name) is tuple:  # --sleep_layers=7:21, --model_set=layers=attn,gdn
            items = re.split(r"[,:]", value)
            value = ",".join(items) if all(i.isdigit() for i in items) else f'"{tuple(items)!r}"'
        raise flags.Error(f"{arg.split('=')[0]} is now a config field: use --config.{section}.{name}={value}")


def _check_overrides(args: list[str], default: str) -> None:
    """Loads the config that --config names and checks that every --config.<path> is one of its fields, before the
    flag does both: ml_collections' own errors for a missing file or field are tracebacks."""
    value = next((a.split("=", 1)[1] for a in reversed(args) if re.match(r"--?config=", a)), default)
    path, _, preset = value.partition(":")
    try:
        spec = importlib.util.spec_from_file_location("config_file", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config(*[preset] if preset else [])
    except (OSError, ValueError) as e:
        raise flags.Error(f"--config={value}: {e}") from None
    for arg in args:
        field = re.match(r"--?(?:no)?config\.([\w.]+)", arg)
        node = config
        for part in field[1].split(".") if field else ():
            if not hasattr(node, "keys") or part not in node:
                raise flags.Error(f"--config.{field[1]}: {part!r} is not a field there (--help lists them)")
            node = node[part]


def _print_help(configs) -> None:
    """What the launcher runs, its presets, the flags and every config field with its value."""
    print(configs.__doc__)
    print(f"--config: a preset of {configs.__file__}, or FILE.py:PRESET (default: {next(iter(configs.PRESETS))}):")
    for name, about in configs.PRESETS.items():
        print(f"  {name}: {about}")
    print("\nFlags (the runs to train and where):")
    print(FLAGS.module_help(__name__).strip().split("\n", 1)[1])  # less its first line, the module's name
    print(f"\nConfig fields of {_preset_name()}; --config.<section>.<field>=VALUE overrides one (model.vocab_size "
          "and model.window None: the task's):")
    for section in ("model", "train", "task"):
        for key, value in FLAGS.config[section].items():
            print(f"  --config.{section}.{key}={value!r}")


def run(task_name: str) -> None:
    """The launcher of ``task_name``: its config file is experiments/configs/<task_name>.py."""
    configs = _configs(task_name)
    default = f"{configs.__file__}:{next(iter(configs.PRESETS))}"

    def parse(argv: list[str]) -> list[str]:
        args = [a for a in argv[1:] if a not in _HELP]
        try:
            _refuse_removed_flags(configs, args)
            args = _expand_config(configs, args)
            _check_overrides(args, default)
            # Defined only now: the flag reads the overrides from sys_argv (and loads its default at once).
            config_flags.DEFINE_config_file(
                "config", default, f"A preset ({', '.join(configs.PRESETS)}) or FILE.py:PRESET; "
                "--config.<section>.<field>=VALUE overrides a field (sections model, train, task).",
                lock_config=True, sys_argv=[argv[0], *args])
            remaining = FLAGS([argv[0], *args])
        except flags.Error as e:
            _usage_error(e)
        if any(a in _HELP for a in argv[1:]):
            _print_help(configs)
            sys.exit(0)
        _ARGS[:] = argv[1:]
        return remaining

    app.run(lambda argv: main(task_name), flags_parser=parse)
