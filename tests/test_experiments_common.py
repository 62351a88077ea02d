"""Launchers and sharding: bad flags and config values fail at start naming them; a sharded run (8 simulated CPU
devices) matches one device; sweep reports are written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sleepjax import report

REPO = Path(__file__).resolve().parents[1]
SLOW = pytest.mark.slow  # cases the default run skips (each case starts a launcher: ~2 s)


def launch(module, *args, env=None):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


@pytest.mark.parametrize("module,args,needle", [
    ("experiments.rule110", ["--sleep_n=0"], "sleep_n"),
    pytest.param("experiments.depo", ["--config=huge"], "config", marks=SLOW),
    pytest.param("experiments.depo", ["--config=experiments/configs/depo.py:huge"], "preset must be one of",
                 marks=SLOW),
    pytest.param("experiments.gsm_infinite", ["--config.train.mesh=data:3"],
                 "config.train: mesh='data:3' uses 3 devices", marks=SLOW),
    pytest.param("experiments.rule110", ["--workdir=/proc/no_such_dir/run"], "workdir", marks=SLOW),
    ("experiments.depo", ["--config.model.d_modle=3"], "--config.model.d_modle"),
    pytest.param("experiments.depo", ["--config.model.d_model=0"],
                 "config.model: ModelConfig.d_model must be an int >= 1", marks=SLOW),
    pytest.param("experiments.depo", ["--config.train.steps=ten"], "--config.train.steps", marks=SLOW),
    pytest.param("experiments.depo", ["--config.train.keep_checkpoints=0"], "config.train: keep_checkpoints must be",
                 marks=SLOW),
    pytest.param("experiments.rule110", ["--config.task.width=2"], "config.task: width must be", marks=SLOW),
    pytest.param("experiments.depo", ["--sweep_n=1,0"], "--sweep_n", marks=SLOW),
])
def test_bad_flags_fail_at_start(module, args, needle, tmp_path):
    """One line on stderr names the flag or field (no traceback, no usage dump), before any work; exit code 2."""
    out = launch(module, *args, f"--workdir={tmp_path / 'w'}" if "workdir" not in args[0] else "--sleep_n=1")
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1 and needle in out.stderr, \
        (out.stdout[-1000:], out.stderr[-2000:])
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "w" / "checkpoints").exists(), "no work may start before the flags are checked"


@pytest.mark.parametrize("removed,replacement", [
    ("--steps=10", "--config.train.steps=10"),
    pytest.param("--model_set=d_model=16", "--config.model.d_model=16", marks=SLOW),
    pytest.param("--max_hops=3", "--config.task.max_hops=3", marks=SLOW),
    pytest.param("--init_from=/ckpt/qwen3", "--config.train.init_from=/ckpt/qwen3", marks=SLOW),
    pytest.param("--mesh=data:8", "--config.train.mesh=data:8", marks=SLOW),
    pytest.param("--sleep_layers=7:21", "--config.model.sleep_layers=7,21", marks=SLOW),
    pytest.param("--dtype=bfloat16", "--config.model.dtype=bfloat16", marks=SLOW),
])
def test_a_removed_flag_names_its_replacement(removed, replacement, tmp_path):
    out = launch("experiments.depo", removed, f"--workdir={tmp_path / 'w'}")
    assert out.returncode == 2 and replacement in out.stderr.strip().splitlines()[-1], out.stderr[-2000:]
    assert not (tmp_path / "w").exists(), "no work may start before the flags are checked"


def test_help_lists_the_flags_and_every_config_field():
    out = launch("experiments.gsm_infinite", "--config=paper_sliding", "--config.train.steps=7", "--help")
    assert out.returncode == 0, out.stderr[-2000:]
    for needle in ("--sweep_n", "--seeds", "--parallel", "--config:", "paper_sliding:", "--config.train.steps=7",
                   "--config.model.eviction='sliding'", "--config.task.window=512", "--config.model.window=None",
                   "--sleep_n", "--workdir", "--eval_sleep_n", "Exit codes:", "fine-tuning default"):
        assert needle in out.stdout, needle


def test_report_writes_table_and_plot(tmp_path):
    run_dirs = []
    for n, seed, final in ((1, 0, 0.2), (4, 0, 0.9), (4, 1, 0.7)):
        d = tmp_path / f"N{n}_seed{seed}"
        d.mkdir()
        evals = [{"step": s, "kind": "eval", "sequences": s * 64, "exact": final * s / 300,
                  "exact/k=1": min(1.0, 2 * final * s / 300), "exact/k=2": final * s / 300} for s in (100, 200, 300)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
        (d / "results.json").write_text(json.dumps({
            "sleep_n": n, "seed": seed, "sequences": 300 * 64, "seconds_per_step": 0.1 * (1 + n / 4),
            "wall_clock_s": 60.0, "difficulty_name": "k", "final_eval": evals[-1]}))
        run_dirs.append(d)
    (run_dirs[0] / "label.txt").write_text("N = 1\n")
    baseline = tmp_path / "transformer_seed0"
    baseline.mkdir()
    (baseline / "label.txt").write_text("transformer (full context)")
    (baseline / "metrics.jsonl").write_text((run_dirs[0] / "metrics.jsonl").read_text())
    (baseline / "results.json").write_text((run_dirs[0] / "results.json").read_text())
    text = report.write_comparison(tmp_path, run_dirs + [baseline], title="test")
    # Seeds: mean [min-max] per difficulty; every seed in its own table; labels group runs.
    assert "| N = 4 | 0,1 | 19200 | 0.800 [0.700-0.900] | 1.00 [1.00-1.00] | 0.80 [0.70-0.90] |" in text
    assert "| N = 4 | 1 | 0.700 | 1.00 | 0.70 |" in text and "| N = 4 | 0 | 0.900 | 1.00 | 0.90 |" in text
    assert "| transformer (full context) | 0 | 19200 | 0.200 |" in text
    assert "1.60x" in text  # sleep cost: N = 4 at 0.2 s/step vs N = 1 at 0.125
    assert (tmp_path / "accuracy.png").stat().st_size > 1000


def test_report_cost_column_without_a_timed_n1_run(tmp_path):
    """A run without step times (seconds_per_step None) gives '-' for the sleep cost, never 'nanx'."""
    run_dirs = []
    for n, step_time in ((1, None), (4, 0.2)):
        d = tmp_path / f"N{n}_seed0"
        d.mkdir()
        final = {"step": 10, "kind": "eval", "sequences": 640, "exact": 0.5, "exact/k=1": 0.5}
        (d / "metrics.jsonl").write_text(json.dumps(final) + "\n")
        (d / "results.json").write_text(json.dumps({
            "sleep_n": n, "seed": 0, "sequences": 640, "seconds_per_step": step_time, "wall_clock_s": 6.0,
            "difficulty_name": "k", "final_eval": final}))
        run_dirs.append(d)
    text = report.comparison_table([report.read_run_summary(d) for d in run_dirs])
    assert "nan" not in text and "| 0.200 | - |" in text, text
