"""Gradient accumulation (``TrainConfig.grad_accum``, ``--grad_accum``) and what a run reports of its sleep."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import sleepjax
from helpers.compare import assert_trees_close
from helpers.runs import MICRO, checkpoint_params
from sleepjax import tasks
from sleepjax.metrics_log import read_metrics
from sleepjax.train import TrainConfig, init_train_state, make_optimizer, train, train_step

REPO = Path(__file__).resolve().parents[1]


def test_micro_batches_give_the_full_batch_update():
    """Two optimizer steps (Muon + AdamW) on batches of 8 with mixed layouts (supervised counts differ between
    rows, so a mean of micro-batch means would be wrong): K = 2 and 4 micro-batches end at the parameters and
    metrics of K = 1 to float rounding. Catches micro-batch losses averaged instead of summed over the whole
    batch's count, a micro-batch dropped, or rows split unevenly."""
    cfg = sleepjax.ModelConfig(**MICRO, vocab_size=11, window=6, sleep_n=3)
    train_cfg = TrainConfig(steps=10, batch_size=8, muon_lr=0.02, adam_lr=3e-3, warmup_steps=1)
    tx = make_optimizer(train_cfg)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(2):
        mask = np.zeros((8, 20), bool)
        for b in range(8):  # each example supervised in its own random windows and positions
            mask[b, rng.choice(19, size=rng.integers(1, 6), replace=False)] = True
        batches.append({"tokens": rng.integers(0, 11, (8, 20)).astype(np.int32), "loss_mask": mask})
    results = {}
    for k in (1, 2, 4):
        state = init_train_state(cfg, train_cfg, tx)
        step = jax.jit(lambda s, b, k=k: train_step(s, b, tx=tx, grad_accum=k))
        metrics = []
        for batch in batches:
            state, m = step(state, batch)
            metrics.append({key: float(v) for key, v in m.items()})
        results[k] = (state.params, metrics)
    for k in (2, 4):
        assert_trees_close(results[k][0], results[1][0], 1e-5, f"grad_accum={k} params")
        for got, want in zip(results[k][1], results[1][1]):
            assert got.keys() == want.keys()
            for key in want:
                assert abs(got[key] - want[key]) <= 1e-5 * max(1.0, abs(want[key])), (k, key, got[key], want[key])
    assert results[1][1][0]["should_sleep"] > 0 and results[1][1][0]["slept"] == results[1][1][0]["should_sleep"]


@pytest.mark.slow
def test_train_with_grad_accum_and_the_sleep_it_reports(tmp_path):
    """train() with grad_accum = 2 ends where grad_accum = 1 does (same data), logs and records the slept fraction
    (1.0: Rule 110's string windows all sleep), and names the schedule it ran; a batch size that is not a multiple
    of grad_accum is refused before any work."""
    task = tasks.get("rule110", width=6, strings=2, t=1)
    model_cfg = sleepjax.ModelConfig(**MICRO, vocab_size=task.vocab_size, window=task.window,
                                            sleep_n=2)
    base = dict(steps=4, batch_size=8, muon_lr=0.02, adam_lr=3e-3, warmup_steps=1, eval_every=4, eval_size=8,
                eval_batch_size=8, checkpoint_every=4, log_every=2)
    runs = {}
    for k in (1, 2):
        results = train(task, model_cfg, TrainConfig(**base, grad_accum=k), tmp_path / f"k{k}")
        runs[k] = results
        assert results["sleep_schedule"] == "SSW"
        assert results["slept_fraction"] == {"train": 1.0, "eval": 1.0}
        assert results["sleep_counts"]["train"]["should_sleep"] == 4 * 8 * 2  # steps x batch x string windows
        rows = read_metrics(tmp_path / f"k{k}" / "metrics.jsonl")
        assert all(r["slept_fraction"] == 1.0 for r in rows), rows
    for a, b in zip(checkpoint_params(tmp_path / "k2"), checkpoint_params(tmp_path / "k1")):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match=r"batch_size \(8\) must be a multiple of grad_accum \(3\)"):
        TrainConfig(**base, grad_accum=3)


class WrongSchedule(type(tasks.get("rule110", width=6, strings=2, t=1))):
    """Rule 110 declaring every window W: its string windows are never supervised, so the declaration is wrong."""

    def sleep_schedule(self, window=None):
        return "W" * -(-self.seq_len // (window or self.window))


@pytest.mark.slow
def test_a_wrong_declared_schedule_costs_a_warning_not_a_wrong_sleep(tmp_path, capsys):
    """A task whose declared schedule does not fit its batches still sleeps every example where Algorithm 1 says
    (those windows run as M), says so once, and reports a slept fraction of 1.0. Catches the trainer trusting the
    declaration (the string windows would then wake: slept fraction 0)."""
    task = WrongSchedule(width=6, strings=2, t=1)
    model_cfg = sleepjax.ModelConfig(**MICRO, vocab_size=task.vocab_size, window=task.window,
                                            sleep_n=2)
    cfg = TrainConfig(steps=2, batch_size=4, warmup_steps=1, eval_every=2, eval_size=4, eval_batch_size=4,
                      checkpoint_every=2, log_every=1)
    results = train(task, model_cfg, cfg, tmp_path)
    out = capsys.readouterr().out
    assert out.count("does not fit the task's sleep schedule 'WWW'") == 1, out
    assert "runs as 'MMW'" in out
    assert results["slept_fraction"] == {"train": 1.0, "eval": 1.0}


@pytest.mark.slow
def test_launcher_grad_accum_flag(tmp_path):
    """config.train.grad_accum reaches TrainConfig (recorded in config.json) and a bad value is a usage error
    naming it."""
    train = dict(steps=1, batch_size=4, eval_size=4, eval_every=1, checkpoint_every=1, warmup_steps=0)
    common = [sys.executable, "-m", "experiments.rule110", "--config.task.width=6", "--config.task.strings=2",
              "--config.task.t=1", *[f"--config.train.{k}={v}" for k, v in train.items()]] + [
        f"--config.model.{k}={v!r}" for k, v in MICRO.items()]
    bad = subprocess.run(common + ["--config.train.grad_accum=3", f"--workdir={tmp_path / 'bad'}"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "must be a multiple of grad_accum (3)" in bad.stderr + bad.stdout
    good = subprocess.run(common + ["--config.train.grad_accum=2", f"--workdir={tmp_path / 'good'}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stderr[-2000:]
    assert json.loads((tmp_path / "good" / "config.json").read_text())["train"]["grad_accum"] == 2
