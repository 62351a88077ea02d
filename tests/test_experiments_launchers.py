"""Every launcher end to end for a few steps: ``experiments.rule110`` and ``experiments.gsm_infinite`` as single runs,
``experiments.depo`` as a 2-N sweep with ``--parallel=2`` (the README's main-job command) writing results.md and
accuracy.png. A micro model (d = 16, one attention and one GDN layer, set by --config.model.* overrides) and tiny
batches; the three commands start together (four trainings, ~20 s of CPU each, mostly XLA compilation, cached in
conftest's shared compilation cache) and the tests then read their outputs.
"""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.runs import MICRO, finished_checkpoints
from sleepjax.metrics_log import read_metrics

REPO = Path(__file__).resolve().parents[1]
MICRO_FLAGS = [f"--config.model.{k}={v!r}" for k, v in MICRO.items()]
COMMON = ["--config.train.steps=3", "--config.train.batch_size=4", "--config.train.eval_size=4",
          "--config.train.eval_every=2", "--config.train.checkpoint_every=2", "--config.train.log_every=1",
          "--config.train.warmup_steps=1"]
COMMANDS = {
    # a preset of a config file named by its path (paper: its learning rates stay), keeping one checkpoint
    "rule110": ["experiments.rule110", "--config=experiments/configs/rule110.py:paper", "--config.task.width=6",
                "--config.task.strings=2", "--config.task.t=1", "--sleep_n=2", "--config.train.keep_checkpoints=1",
                *MICRO_FLAGS],
    "gsm_infinite": ["experiments.gsm_infinite", "--config.task.op_max=3", "--sleep_n=2", *MICRO_FLAGS],
    "depo_sweep": ["experiments.depo", "--sweep_n=1,2", "--parallel=2", "--config.task.max_hops=2",
                   "--config.task.questions=4", *MICRO_FLAGS],
}
TIMEOUT = 600


@pytest.fixture(scope="module")
def runs(tmp_path_factory, launcher_env):
    """Starts the three launchers at once and waits for all of them: {name: (returncode, output, workdir)}."""
    root = tmp_path_factory.mktemp("launchers")
    env = {**launcher_env, "JAX_PLATFORMS": "cpu"}
    procs = {}
    for name, (module, *args) in COMMANDS.items():
        log = (root / f"{name}.log").open("w")
        procs[name] = (subprocess.Popen([sys.executable, "-m", module, *args, *COMMON, f"--workdir={root / name}"],
                                        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    deadline = time.time() + TIMEOUT
    out = {}
    for name, (proc, log) in procs.items():
        try:
            proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        out[name] = (proc.returncode, (root / f"{name}.log").read_text(), root / name)
    return out


def finished(runs, name):
    code, output, workdir = runs[name]
    assert code == 0, f"{name} exited {code}:\n{output[-3000:]}"
    return workdir, output


def check_run(run_dir, difficulty_keys, sleep_n):
    """A run of 3 steps: results, metrics (train every step, eval at 2 and 3), checkpoints at 2 and 3 (the final
    step is saved although 3 is not a multiple of checkpoint_every=2), and the overrides in config.json."""
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == 3 and results["sleep_n"] == sleep_n
    assert set(k for k in results["final_eval"] if k.startswith("exact/")) == set(difficulty_keys)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [2, 3]
    assert 3 in finished_checkpoints(run_dir), "the final step must be checkpointed"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["d_model"] == 16 and config["model"]["mlp_dim"] == 32  # every override arrived
    assert config["model"]["layers"] == ["attn", "gdn"] and config["model"]["sleep_n"] == sleep_n
    assert config["train"]["steps"] == 3 and config["train"]["batch_size"] == 4
    return config


@pytest.mark.slow
def test_rule110_single_run(runs):
    workdir, output = finished(runs, "rule110")
    config = check_run(workdir, ["exact/t=1"], sleep_n=2)
    assert config["task_options"]["width"] == 6 and config["task_options"]["t"] == 1
    assert config["train"]["muon_lr"] == 2e-3 and config["train"]["adam_lr"] == 5e-5  # the paper preset's
    assert config["train"]["keep_checkpoints"] == 1
    assert "eval @ 3" in output


@pytest.mark.slow
def test_gsm_infinite_single_run(runs):
    workdir, _ = finished(runs, "gsm_infinite")
    config = check_run(workdir, ["exact/op=1", "exact/op=2", "exact/op=3"], sleep_n=2)  # test ops cycle 1, 2, 3, 1
    assert config["task_options"]["op_max"] == 3


@pytest.mark.slow
def test_depo_sweep_writes_comparison(runs):
    workdir, output = finished(runs, "depo_sweep")
    for n in (1, 2):
        config = check_run(workdir / f"N{n}_seed0", ["exact/k=1", "exact/k=2"], sleep_n=n)
        # the sweep's children must get every override given to the parent (task fields included)
        assert config["task_options"]["max_hops"] == 2 and config["task_options"]["questions"] == 4
    text = (workdir / "results.md").read_text()
    for n in (1, 2):  # a table row per N ("| 1 |" or "| N = 1 |")
        assert any(re.match(rf"\|\s*(N\s*=\s*)?{n}\s*\|", line) for line in text.splitlines()), text
    assert (workdir / "accuracy.png").stat().st_size > 1000
    assert "wrote" in output and "results.md" in output


_RECORD_CHILDREN = """
import json, subprocess, sys
from experiments import common
children = []
class Child:  # stands in for the sweep's child processes: records the command line, finishes at once
    returncode = 0
    def __init__(self, argv, **kwargs):
        children.append(list(argv))
    def poll(self):
        return 0
    def wait(self, *args, **kwargs):
        return 0
subprocess.Popen = Child
try:
    common.run("depo")
except BaseException:  # SystemExit, or the report finding no finished runs
    pass
print(json.dumps(children))
"""


def test_sweep_children_get_every_override_given(tmp_path):
    """A parallel sweep's children re-run the launcher with every argument given to it (the config and every
    override, a repeated one as repeated arguments), the per-run flags (N, seed, workdir) replaced by their own."""
    given = ["--config=tiny_k4", "--config.task.max_hops=2", "--config.model.d_model=16",
             "--config.model.layers=attn", "--config.model.layers=gdn", "--config.train.steps=7",
             "--config.train.seed=5"]
    out = subprocess.run([sys.executable, "-c", _RECORD_CHILDREN, "--sweep_n=1,2", "--seeds=3", "--parallel=2",
                          *given, f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    children = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(children) == 2, out.stdout[-2000:] + out.stderr[-2000:]
    for argv in children:
        assert [a for a in argv if a in given] == given[:-1], argv  # in order; the parent's seed replaced
        assert "--config.train.seed=3" in argv and not any(a.startswith(("--seeds", "--sweep_n")) for a in argv)
    assert sorted(next(a for a in argv if a.startswith("--sleep_n=")) for argv in children) == [
        "--sleep_n=1", "--sleep_n=2"]
