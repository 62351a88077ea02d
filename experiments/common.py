"""The part every launcher shares: a config -> (task, ModelConfig, TrainConfig) -> one run, or a sweep over N and
seeds with a comparison (``results.md``, ``accuracy.png``).

One way to configure a run: ``--config`` names a preset of the launcher's config file (``--config=paper``, from
``experiments/configs/<task>.py``) or any config file (``--config=path/to/file.py:paper``), and
``--config.<section>.<field>=VALUE`` overrides any field of it (sections model, train, task; see
``experiments/configs/common.py``). The flags defined here say only which runs to train and where.

What a launcher promises its user (``tests/test_experiments_ux.py``): ``--help`` lists every flag and config field
and exits 0; a bad flag, config value, checkpoint or task setting is one ``error: ...`` line on stderr before any
compiling (exit 2); SIGTERM at any point exits 75 (after saving a checkpoint when a step is unsaved), Ctrl-C 130
(the same); ``--config.train.init_from`` on a from-scratch preset trains at fine-tuning rates, said on one line.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
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
flags.DEFINE_list("eval_sleep_tol", None, "After training, evaluate every run's final checkpoint with adaptive "
                  "sleep depth at each of these tolerances (e.g. 0,0.01,0.1; see config.model.sleep_tol), at most the "
                  "largest --eval_sleep_n passes (default: the trained N): accuracy against the mean passes taken.")
flags.DEFINE_bool("distributed", False, "Multi-host: call jax.distributed.initialize() and let it detect the "
                  "cluster (TPU pod slices, SLURM, ...).")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 (implies --distributed).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's id (with --coordinator_address).")

# What a sweep never passes on to its children: the flags that name one run (it sets them for each child) and
# the multi-host ones (a child of a parallel sweep is one local process).
_NOT_FOR_CHILDREN = ("sleep_n", "workdir", "sweep_n", "seeds", "parallel", "baselines", "baseline",
                     "compute_match_n", "eval_sleep_n", "eval_sleep_tol", "config.train.seed", "config.model.sleep_n",
                     "distributed", "coordinator_address", "num_processes", "process_id")
_HELP = ("-h", "-help", "--help", "--helpshort", "-?", "--helpfull", "-helpfull")
# With config.train.init_from the model is the checkpoint's; these fields of config.model still apply (how it
# sleeps and runs, not what it is). None keeps the checkpoint's.
_PRETRAINED_POLICY = ("window", "sleep_n", "eviction", "sleep_layers", "dtype", "remat", "gdn_backend",
                      "attn_backend")
_ARGS: list[str] = []  # the command line as given (a parallel sweep passes it on to its children)
_PRESET: list = []  # the --config file's config before the overrides (which fields the command line changed)
_RATES: dict[str, str] = {}  # with init_from: where each learning rate comes from (finetune_rates)

# Exit codes (README/WORKSPACE "Stopping, resuming, extending"): a usage error, a signal's stop. 75 and 130 are
# sleepjax.train's PREEMPTED_EXIT_CODE and INTERRUPTED_EXIT_CODE (a test checks), spelled here so that the
# handlers work before JAX is imported.
USAGE_EXIT_CODE = 2
STOP_EXIT_CODES = {signal.SIGTERM: 75, signal.SIGINT: 130}
_STOP_NAMES = {signal.SIGTERM: "preempted (SIGTERM)", signal.SIGINT: "interrupted (Ctrl-C)"}


def _ignore_signal(signum, frame) -> None:
    """The Python-level handler of SIGTERM and SIGINT: the watcher thread of _StopSignals acts on them."""


class _StopSignals:
    """SIGTERM and Ctrl-C (SIGINT) in a launcher process, from its start to its exit.

    While nothing is unsaved (starting up, building the task, compiling, the first step of a launch, between the
    runs of a sweep, after a run's last checkpoint) either signal ends the process at once, even inside a long XLA
    compile (a thread reads the signal wakeup fd, where the main thread would only see the signal once the compile
    returns): one line on stderr, exit 75 (SIGTERM: run the same command again) or 130 (Ctrl-C). Once ``train`` has
    trained a step (``unsaved``), it takes the signal at the next step boundary: it saves the checkpoint there and
    raises Preempted (75) or Interrupted (130) (``requested`` tells it which); a second Ctrl-C ends the process at
    once. Several processes: SIGTERM belongs to JAX's preemption service once ``jax.distributed`` is up (every
    process saves the same step, exit 75), and Ctrl-C always ends the process at once (one host cannot make the
    others save). A parallel sweep's parent forwards the stop to its runs and waits for them (``_run_parallel``).
    """

    def __init__(self):
        self.requested: signal.Signals | None = None  # the signal train stops for at its next step boundary
        self.later = False  # True while a step is unsaved (or while a parallel sweep's runs are)
        self.note = "nothing to save yet: no step of this launch was trained"
        self.wake = threading.Event()  # set when a stop is requested (a parallel sweep's parent waits on it)
        self.later_what = "stopping at the end of this step, once its checkpoint is saved"
        self._lock = threading.Lock()
        self._sigints = 0
        read, write = os.pipe()
        os.set_blocking(write, False)
        for signum in STOP_EXIT_CODES:
            signal.signal(signum, _ignore_signal)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(read,), name="stop-signals", daemon=True).start()

    def _watch(self, fd: int) -> None:
        while True:
            for byte in os.read(fd, 64):
                if byte in STOP_EXIT_CODES:
                    self._on(signal.Signals(byte))

    def _on(self, signum: signal.Signals) -> None:
        with self._lock:
            self._sigints += signum == signal.SIGINT
            if not self.later:
                self.exit_now(signum, self.note)
            if signum == signal.SIGINT and self._sigints > 1:
                self.exit_now(signum, "Ctrl-C again: stopping at once, without waiting for the checkpoint")
            first = self.requested is None
            if first or signum == signal.SIGINT:  # Ctrl-C after SIGTERM (a sweep's parent forwards one): 130
                self.requested = signum
            self.wake.set()
        if first:
            _write_stderr(f"{_STOP_NAMES[signum]}: {self.later_what} (Ctrl-C again to stop at once)")

    def exit_now(self, signum: signal.Signals, why: str) -> None:
        if threading.current_thread() is threading.main_thread():
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
        code = STOP_EXIT_CODES[signum]
        _write_stderr(f"{_STOP_NAMES[signum]}: {why}; exit code {code}: run the same command again to resume")
        os._exit(code)

    def unsaved(self, what: str = "stopping at the end of this step, once its checkpoint is saved") -> None:
        """A step is trained and not yet saved: from now on a signal is taken at the next step boundary (train
        saves there), ``what`` says so. One process only (see the class docstring)."""
        import jax

        if jax.process_count() == 1:
            with self._lock:
                self.later, self.later_what = True, what

    def saved(self, note: str = "nothing unsaved: the run's last checkpoint is written") -> None:
        """Everything is saved again (a run returned, a parallel sweep's runs ended): a signal that came meanwhile
        ends the process now, and the next ones at once."""
        with self._lock:
            self.later, self.note = False, note
            if self.requested is not None:
                self.exit_now(self.requested, note)


def _write_stderr(line: str) -> None:
    """One line on stderr without Python's buffered stream (safe from the watcher thread)."""
    os.write(2, (line + "\n").encode())


_STOP: list[_StopSignals] = []  # installed by run(), first thing


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of a launcher call: its N and seed, and whether it is a baseline (see --baselines)."""

    sleep_n: int
    seed: int
    baseline: str = "none"  # "none", "transformer" or "no_eviction"
    compute_match_n: int | None = None  # N = 1 trained for the layer passes of N = this
    sampled: tuple = ()  # N-robust training (config.train.sleep_n_sample): the set each step's N is drawn from

    @property
    def name(self) -> str:
        """Directory name inside a sweep."""
        if self.baseline != "none":
            return f"{self.baseline}_seed{self.seed}"
        if self.compute_match_n:
            return f"N1_flopsN{self.compute_match_n}_seed{self.seed}"
        if self.sampled:
            return f"Nrobust{min(self.sampled)}-{max(self.sampled)}_seed{self.seed}"
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
        if self.sampled:
            return f"N-robust (N in {','.join(map(str, self.sampled))} per step)"
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
    from sleepjax.train import TrainConfig

    sampled = _validated("train", lambda: TrainConfig(sleep_n_sample=config.train.sleep_n_sample).sleep_n_set)
    if sampled:  # one model for every N of the set: its runs differ only by seed
        if FLAGS.sweep_n or FLAGS.baselines or FLAGS.compute_match_n:
            raise ValueError("config.train.sleep_n_sample trains one model for every N of its set: drop --sweep_n, "
                             "--baselines and --compute_match_n (score it at other N with --eval_sleep_n)")
        return [RunSpec(max(sampled), s, sampled=sampled) for s in seeds]
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
    if init_from:
        check_checkpoint(init_from)  # before the task reads its tokenizer there
    options = config.task.to_dict()
    if init_from and "tokenizer" in options and options["tokenizer"] is None:
        options["tokenizer"] = init_from  # a text task speaks the pretrained model's tokens
    task = _validated("task", lambda: tasks.get(task_name, **options))
    fields = {**config.model.to_dict(), "sleep_n": run.sleep_n}
    sampled = _validated("train", lambda: TrainConfig(sleep_n_sample=config.train.sleep_n_sample).sleep_n_set)
    if sampled:  # N-robust training: the model runs up to the largest N of the set
        fields["sleep_n"] = max(sampled)
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


def check_checkpoint(path: str) -> None:
    """A missing or damaged ``init_from`` checkpoint as one error naming it, before anything reads it: the
    directory, its config.json, and every safetensors file whole (its header, and as many bytes as the header
    describes: a copy or download that stopped early is caught here, not as a traceback after compiling)."""
    where, root = f"config.train.init_from={path!r}", Path(path)
    if not root.is_dir():
        raise ValueError(f"{where}: {'not a directory' if root.exists() else 'no such directory'} (a local Hugging "
                         f"Face checkpoint directory: config.json, model.safetensors, tokenizer.json)")
    if not (root / "config.json").is_file():
        raise ValueError(f"{where}: the directory holds no config.json, so it is no Hugging Face checkpoint")
    index, single = root / "model.safetensors.index.json", root / "model.safetensors"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{where}: {index.name} is not a safetensors index ({type(e).__name__}: {e})") from None
    elif single.exists():
        files = [single.name]
    else:
        raise ValueError(f"{where}: the directory holds neither model.safetensors nor model.safetensors.index.json")
    for name in files:
        _check_safetensors(root / name, where)


def _check_safetensors(file: Path, where: str) -> None:
    """The safetensors layout: 8 bytes (little-endian header length n), n bytes of JSON naming each tensor's
    [begin, end) in the data that follows; the file must hold all of it."""
    if not file.is_file():
        raise ValueError(f"{where}: {file.name} is missing (its index lists it)")
    size = file.stat().st_size
    damaged = f"{where}: {file.name} is damaged or cut short ({size} bytes"
    with file.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or 8 + n > size:
            raise ValueError(f"{damaged}: no complete header); copy or download it again")
        try:
            header = json.loads(f.read(n))
            end = max([entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"],
                      default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise ValueError(f"{damaged}: unreadable header, {type(e).__name__}); copy or download it again") from None
    if 8 + n + end != size:
        raise ValueError(f"{damaged}; its header describes {8 + n + end}); copy or download it again")


def probe_task(task, cfg) -> None:
    """Builds the examples whose problems a task setting could make impossible (every difficulty of the test split
    in turn, its last evaluation example, a few training examples), so that "no problem fits context_len" and
    its kind are one error at start instead of a failure after compiling."""
    tests = sorted({*range(min(cfg.eval_size, 32)), max(cfg.eval_size - 1, 0)})
    trains = range(min(cfg.train_examples or 4, 4))
    for split, indices in (("test", tests), ("train", trains)):
        for index in indices:
            try:
                task.example(cfg.eval_seed if split == "test" else cfg.seed, index, split)
            except (ValueError, RuntimeError) as e:
                raise ValueError(f"config.task: {split} example {index}: {e}") from None


def finetune_rates(config, preset, given: list[str]) -> dict[str, str]:
    """With ``config.train.init_from`` set on a preset that trains from scratch (its own init_from is empty), each
    of muon_lr, adam_lr and warmup_steps that the command line does not set takes its fine-tuning default
    (``config_common.FINETUNE_RATES``; warm-up: ``FINETUNE_WARMUP_FRACTION`` of the run's steps). A fine-tuning
    preset keeps its own. Changes ``config``; returns {field: "given" | "default" | "preset"}, where each value
    comes from ({} without init_from)."""
    train = config.train
    if not train.init_from or train.init_from.startswith(config_common.REQUIRED):
        return {}
    scratch = not preset.train.init_from
    steps = (math.ceil(train.epochs * train.train_examples / train.batch_size)
             if train.epochs and train.train_examples and train.batch_size > 0 else train.steps)
    origins = {}
    for name in config_common.FINETUNE_RATES:
        if any(re.match(rf"--?config\.train\.{name}(=|$)", arg) for arg in given):
            origins[name] = "given"
        elif scratch:
            train[name] = config_common.finetune_rate(name, steps)
            origins[name] = "default"
        else:
            origins[name] = "preset"
    return origins


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
    """Trains the runs in child processes, ``parallel`` at a time, each on one CPU thread; logs to run/log.txt.
    SIGTERM or Ctrl-C: no run is started any more, the running ones get SIGTERM (each saves its checkpoint, or
    has nothing to save yet) and once they have ended the sweep exits 75 or 130 (``_StopSignals``); a run stopped
    by a signal of its own makes the sweep exit with its code once the others are done."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_cpu_multi_thread_eigen=false").strip()
    stop = _STOP[0] if _STOP else None
    if stop is not None:  # the children hold unsaved steps: a stop waits for them
        stop.unsaved("stopping the sweep: every running run saves its checkpoint")
    # Longest runs (largest N) first, so the last runs to finish are short ones.
    pending, active, failed = sorted(runs, key=lambda r: -max(r[0].sleep_n, r[0].compute_match_n or 0)), [], []
    stopped: list[int] = []  # exit codes of runs stopped by a signal (75 / 130)
    last_report, forwarded = 0.0, False
    while pending or active:
        if stop is not None and stop.requested is not None and not forwarded:
            forwarded = True
            print(f"stopping the sweep: {len(active)} running run(s) save a checkpoint, {len(pending)} not started",
                  flush=True)
            for proc, *_ in active:
                try:
                    proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        while pending and len(active) < parallel and not forwarded:
            run, run_dir = pending.pop(0)
            log = (run_dir / "log.txt").open("a")
            proc = subprocess.Popen(_child_command(module, run, run_dir), stdout=log, stderr=subprocess.STDOUT,
                                    env=env)
            active.append((proc, log, run, run_dir))
            print(f"started {run.label}, seed {run.seed} -> {run_dir}/log.txt", flush=True)
        if forwarded and not active:
            break
        if stop is not None and not forwarded and stop.wake.wait(2.0):
            continue  # a stop: pass it on at once
        if forwarded or stop is None:
            time.sleep(0.5 if forwarded else 2.0)
        for entry in list(active):
            proc, log, run, run_dir = entry
            if proc.poll() is not None:
                log.close()
                active.remove(entry)
                signalled = proc.returncode in STOP_EXIT_CODES.values()
                status = ("done" if proc.returncode == 0 else f"stopped (exit {proc.returncode})" if signalled
                          else f"FAILED (exit {proc.returncode})")
                print(f"{run.label}, seed {run.seed}: {status}", flush=True)
                if signalled:
                    stopped.append(proc.returncode)
                elif proc.returncode:
                    failed.append(run_dir)
        if time.time() - last_report > 60 and active:
            last_report = time.time()
            for _, _, run, run_dir in active:
                lines = [l for l in (run_dir / "log.txt").read_text().splitlines() if l.startswith("step")]
                print(f"  {run.label}, seed {run.seed}: {lines[-1] if lines else 'compiling...'}", flush=True)
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed; see log.txt in: " + ", ".join(map(str, failed)))
    if stop is not None:  # exits 75 / 130 when the sweep was stopped
        stop.saved("the sweep's runs have stopped, each at its last checkpoint")
    if stopped:
        print(f"{len(stopped)} run(s) stopped before finishing (exit {stopped[0]}): run the same command again to "
              "resume the sweep", file=sys.stderr, flush=True)
        sys.exit(stopped[0])


def _fail(error: BaseException | str, code: int = USAGE_EXIT_CODE):
    """An error as one line on stderr (``error: ...``), then exit ``code``: USAGE_EXIT_CODE for a bad flag, setting,
    checkpoint or task option found before any work, 1 for a run that cannot go on, 3 for a non-finite loss."""
    print("error: " + " ".join(str(error).split()), file=sys.stderr, flush=True)
    sys.exit(code)


def _preset_name() -> str:
    """``paper`` for --config=paper or --config=FILE.py:paper (the file's name for a file without a preset)."""
    path, _, preset = FLAGS["config"].config_filename.partition(":")
    return preset or Path(path).stem


def _rates_line(config, preset, origins: dict[str, str]) -> str:
    """The learning rates of an init_from run and where each comes from, said before any work."""
    train, name = config.train, _preset_name()
    show = lambda section, keys: ", ".join(f"{k}={section[k]!r}" for k in keys)
    parts = []
    for origin in ("default", "given", "preset"):
        keys = [k for k, v in origins.items() if v == origin]
        if keys and origin == "default":
            parts.append(f"{show(train, keys)}: the fine-tuning defaults (experiments/configs/common.py "
                         f"FINETUNE_RATES), not the from-scratch preset {name}'s {show(preset.train, keys)} "
                         f"(--config.train.<field>=VALUE sets them)")
        elif keys:
            parts.append(f"{show(train, keys)}: " + ("given" if origin == "given" else f"the preset {name}'s"))
    return f"fine-tuning {train.init_from} ({train.optimizer}): learning rates " + "; ".join(parts)


def _train(train, task, model_cfg, train_cfg, workdir: Path) -> None:
    """``train`` for one run, its expected failures as one ``error:`` line (exit 1; 3 for a non-finite loss)."""
    from sleepjax.train import Preempted, UnreadableCheckpoints

    try:
        train(task, model_cfg, train_cfg, workdir, stop=_STOP[0] if _STOP else None)
    except Preempted as e:  # Interrupted too: checkpoint saved and said so; exit 75 (run the same command again) / 130
        sys.exit(e.code)
    except FloatingPointError as e:
        _fail(e, 3)
    except (UnreadableCheckpoints, ValueError, OSError) as e:  # ValueError: a workdir's run with other settings, ...
        _fail(e, 1)


def main(task_name: str) -> None:
    """Trains what the flags ask for (after ``run`` parsed them)."""
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO; the progress line says enough
    try:
        config = FLAGS.config
        runs = expand_runs(config)
        init_distributed()
        from sleepjax import mesh as mesh_lib, report
        from sleepjax.train import check_setup

        several = bool(FLAGS.sweep_n or FLAGS.seeds or FLAGS.baselines)
        single_name = (f"_N{runs[0].sleep_n}" if runs[0].baseline == "none" and not runs[0].compute_match_n
                       else f"_{runs[0].name.rsplit('_seed', 1)[0]}")
        workdir = Path(FLAGS.workdir or f"runs/{task_name}/{_preset_name()}" + ("" if several else single_name))
        eval_ns = [int(n) for n in FLAGS.eval_sleep_n] if FLAGS.eval_sleep_n else []
        if any(n < 1 for n in eval_ns):
            raise ValueError(f"--eval_sleep_n values must be >= 1, got {FLAGS.eval_sleep_n}")
        eval_tols = _eval_tols(FLAGS.eval_sleep_tol)
        _validated("train", lambda: mesh_lib.parse_mesh(config.train.mesh))
        built = {run: build(task_name, config, run) for run in runs}  # validates everything
        for task, model_cfg, train_cfg in built.values():  # the settings against the devices and the workdir
            check_setup(task, model_cfg, train_cfg, workdir)
        task, _, train_cfg = built[runs[0]]
        probe_task(task, train_cfg)  # examples no setting can make: before compiling
    except (ValueError, OSError) as e:  # OSError: a file a setting names (a tokenizer, a checkpoint) is missing
        _fail(e)
    from sleepjax.train import train

    if _RATES:
        print(_rates_line(config, _PRESET[0], _RATES), flush=True)
    if not several:
        task, model_cfg, train_cfg = built[runs[0]]
        (workdir / report.LABEL_FILE).write_text(runs[0].label + "\n")
        print(f"{task_name}: {_preset_name()}; N = {model_cfg.sleep_n}; workdir {workdir}", flush=True)
        _train(train, task, model_cfg, train_cfg, workdir)
        if eval_ns:
            print(report.eval_sleep_n_table([_evaluate_at_n(workdir, eval_ns)]))
        if eval_tols:
            print(report.eval_sleep_tol_table([_evaluate_at_tol(workdir, eval_tols, max(eval_ns, default=0))]))
        return

    run_dirs = {run: workdir / run.name for run in runs}
    for run, run_dir in run_dirs.items():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / report.LABEL_FILE).write_text(run.label + "\n")
    print(f"{task_name} sweep: {len(runs)} runs ({', '.join(sorted({r.label for r in runs}))}; seeds "
          f"{sorted({r.seed for r in runs})}), {FLAGS.parallel} at a time -> {workdir}", flush=True)
    if FLAGS.parallel > 1:
        try:
            _run_parallel(f"experiments.{task_name}", list(run_dirs.items()), FLAGS.parallel)
        except RuntimeError as e:  # runs that failed, named
            _fail(e, 1)
    else:
        for run in runs:
            print(f"--- {run.label}, seed = {run.seed} ---", flush=True)
            _train(train, *built[run], run_dirs[run])
    if eval_ns:
        for run in runs:
            if run.baseline == "none":
                _evaluate_at_n(run_dirs[run], eval_ns)
    if eval_tols:
        print(report.eval_sleep_tol_table([_evaluate_at_tol(run_dirs[run], eval_tols, max(eval_ns, default=0))
                                           for run in runs if run.baseline == "none"]))
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


def _eval_tols(values) -> list[float]:
    """--eval_sleep_tol as floats >= 0, or a ValueError naming the flag."""
    try:
        tols = [float(v) for v in values or []]
    except ValueError:
        tols = None
    if tols is None or any(not (0 <= t < float("inf")) for t in tols):
        raise ValueError(f"--eval_sleep_tol must be finite numbers >= 0 (e.g. 0,0.01,0.1), got {values}")
    return tols


def _evaluate_at_tol(run_dir: Path, tols: list[float], max_n: int) -> dict:
    """The run's final checkpoint on its held-out set with adaptive depth at each tolerance, at most ``max_n``
    passes (0: the trained N); written to eval_sleep_tol.json."""
    from sleepjax import report
    from sleepjax.evaluate import evaluate_at_sleep_tol
    from sleepjax.train import load_run

    params, model_cfg, train_cfg, task = load_run(run_dir)
    max_n = max_n or model_cfg.sleep_n
    batches = task.eval_set(train_cfg.eval_seed, train_cfg.eval_size, train_cfg.eval_batch_size)
    result = {"label": report.run_label(run_dir, model_cfg.sleep_n), "seed": train_cfg.seed,
              "trained_n": model_cfg.sleep_n, "max_n": max_n,
              "by_tol": {repr(tol): metrics for tol, metrics in evaluate_at_sleep_tol(
                  params, batches, tols, max_n, num_items=task.num_items,
                  difficulty_name=task.difficulty_name).items()}}
    (run_dir / report.EVAL_SLEEP_TOL_FILE).write_text(json.dumps(result, indent=2))
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


def _check_overrides(args: list[str], default: str):
    """Loads the config that --config names and checks that every --config.<path> is one of its fields, before the
    flag does both: ml_collections' own errors for a missing file or field are tracebacks. Returns that config (as
    the file builds it, before the overrides)."""
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
            if hasattr(type(node), part):  # e.g. task.items: ml_collections finds the ConfigDict method instead
                raise flags.Error(f"--config.{field[1]}: ml_collections cannot override a field named {part!r} "
                                  f"from the command line (a ConfigDict method has that name); set it in a copy "
                                  f"of the config file (--config=FILE.py:PRESET)")
            node = node[part]
    return config


_EXIT_CODES_HELP = """Exit codes:
  0    done (or a finished run started again: nothing to train)
  1    a run cannot go on: no checkpoint restores, the workdir holds a run with other settings, a sweep's run failed
  2    a bad flag, config value, checkpoint (config.train.init_from) or task setting, found before any work
  3    the loss became NaN/inf (the last good checkpoint is kept)
  75   SIGTERM (preemption): the checkpoint of the step it was in is saved (nothing to save yet: none); run the
       same command again to resume
  130  Ctrl-C: the same as SIGTERM (a second Ctrl-C stops at once, without the checkpoint)"""


def _print_help(configs, full: bool = False) -> None:
    """What the launcher runs, its presets, the flags and every config field with its value; ``full``: also the
    flags of absl and the libraries (logging, ...)."""
    print(configs.__doc__)
    print(f"--config: a preset of {configs.__file__}, or FILE.py:PRESET (default: {next(iter(configs.PRESETS))}):")
    for name, about in configs.PRESETS.items():
        print(f"  {name}: {about}")
    print("\nFlags (the runs to train and where):")
    print(FLAGS.module_help(__name__).strip().split("\n", 1)[1])  # less its first line, the module's name
    config = FLAGS.config
    print(f"\nConfig fields of {_preset_name()} (with the overrides given); --config.<section>.<field>=VALUE "
          "overrides one (model.vocab_size and model.window None: the task's):")
    for section in ("model", "train", "task"):
        for key, value in config[section].items():
            print(f"  --config.{section}.{key}={value!r}")
    rates = ", ".join(f"{k}={v!r}" for k, v in config_common.FINETUNE_RATES.items() if v is not None)
    print("\n" + textwrap.fill(
        "Fine-tuning (--config.train.init_from=DIR, a local Hugging Face checkpoint): the model is the checkpoint's "
        "(of the model section only " + ", ".join(_PRETRAINED_POLICY) + " apply). On a preset that trains from "
        f"scratch, each of muon_lr / adam_lr / warmup_steps not given takes its fine-tuning default ({rates}, "
        f"warmup_steps={config_common.FINETUNE_WARMUP_FRACTION:g} x the run's steps), said on one line at start; "
        "the fine-tuning presets keep their own rates.", width=116, subsequent_indent="  "))
    init_from = config.train.init_from
    if init_from and not init_from.startswith(config_common.REQUIRED):
        print(_checkpoint_help(init_from, config))
    print("\n" + _EXIT_CODES_HELP)
    if full:
        print("\nOther flags (absl and the libraries):")
        for module, module_flags in sorted(FLAGS.flags_by_module_dict().items()):
            if module != __name__ and not any(f.name == "config" for f in module_flags):
                print(FLAGS.module_help(module))
    else:
        print("\n--helpfull also lists absl's own flags (logging, ...).")


def _checkpoint_help(init_from: str, config) -> str:
    """The model --config.train.init_from names, as training would load it (or why it cannot)."""
    try:
        check_checkpoint(init_from)
        from sleepjax import pretrained

        model = pretrained.load_config(init_from, insert_gdn=config.train.insert_gdn,
                                       insert_kind=config.train.insert_kind)
        model_type = json.loads((Path(init_from) / "config.json").read_text()).get("model_type")
    except (ValueError, OSError) as e:
        return f"  {init_from}: error: {e}"
    return (f"  {init_from}: model_type {model_type}, {len(model.layers)} layers {','.join(model.layers)}, d_model "
            f"{model.d_model}, vocab {model.vocab_size}" + (f", {model.loop_steps} loops" if model.loop_steps > 1
                                                            else ""))


def run(task_name: str) -> None:
    """The launcher of ``task_name``: its config file is experiments/configs/<task_name>.py."""
    if not _STOP and threading.current_thread() is threading.main_thread():
        _STOP.append(_StopSignals())  # first: SIGTERM / Ctrl-C from here on exit 75 / 130
    configs = _configs(task_name)
    default = f"{configs.__file__}:{next(iter(configs.PRESETS))}"

    def parse(argv: list[str]) -> list[str]:
        args = [a for a in argv[1:] if a not in _HELP]
        try:
            _refuse_removed_flags(configs, args)
            args = _expand_config(configs, args)
            _PRESET[:] = [_check_overrides(args, default)]
            # Defined only now: the flag reads the overrides from sys_argv (and loads its default at once).
            config_flags.DEFINE_config_file(
                "config", default, f"A preset ({', '.join(configs.PRESETS)}) or FILE.py:PRESET; "
                "--config.<section>.<field>=VALUE overrides a field (sections model, train, task).",
                lock_config=True, sys_argv=[argv[0], *args])
            remaining = FLAGS([argv[0], *args])
            _RATES.clear()
            _RATES.update(finetune_rates(FLAGS.config, _PRESET[0], argv[1:]))  # --help shows them too
        except flags.UnrecognizedFlagError as e:
            _fail(f"{e} (--help lists the flags)")
        except flags.Error as e:
            _fail(e)
        if any(a in _HELP for a in argv[1:]):
            _print_help(configs, full=any(a.endswith("helpfull") for a in argv[1:]))
            sys.exit(0)
        if remaining[1:]:
            _fail(f"unexpected argument {remaining[1]!r}: flags are --name=VALUE (--help lists them)")
        _ARGS[:] = argv[1:]
        return remaining

    app.run(lambda argv: main(task_name), flags_parser=parse)
