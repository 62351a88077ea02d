"""The paper's controls as launcher flags: baselines (attention-only transformer, hybrid without eviction, compute-
matched N = 1) as rows of a sweep's report, evaluation of trained checkpoints at other N, sliding eviction."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import sleepjax
from sleepjax.model import layer_passes

REPO = Path(__file__).resolve().parents[1]
MICRO = [f"--config.model.{k}={v}" for k, v in dict(
    d_model=16, attn_heads=1, attn_kv_heads=1, attn_head_dim=8, gdn_heads=1, gdn_value_heads=1, gdn_key_dim=8,
    gdn_value_dim=8, mlp_dim=32, chunk_size=16).items()]
COMMON = [f"--config.train.{k}={v}" for k, v in dict(
    steps=2, batch_size=4, eval_size=4, eval_every=2, checkpoint_every=2, log_every=1, warmup_steps=1).items()] + [
    "--config.task.max_hops=2", "--config.task.questions=4"]


def test_layer_passes_counts_windows_and_sleep_layers():
    """Windows 0 and 2 of 3 sleep (nothing supervised), window 1 wakes (every example supervised); 4 layers,
    sleep_layers=(1, 3). A window supervised in one example only is M: the batch runs N passes there."""
    cfg = sleepjax.ModelConfig(window=4, sleep_n=3)
    mask = np.zeros((2, 11), bool)
    mask[:, 5] = True
    assert layer_passes(cfg, mask) == 4 + 2 * 3 * 4
    assert layer_passes(cfg.replace(sleep_layers=(1, 3)), mask) == 4 + 2 * (2 + 3 * 2)
    assert layer_passes(cfg.replace(sleep_n=1), mask) == 3 * 4
    mask[0, 5] = False
    assert layer_passes(cfg, mask) == 3 * 3 * 4


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("variants") / "sweep"
    env = {**os.environ, "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-m", "experiments.depo", "--sweep_n=2", "--config.model.eviction=sliding",
                          "--baselines=transformer,no_eviction,compute_matched", "--eval_sleep_n=1,3",
                          *MICRO, *COMMON, f"--workdir={workdir}"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return workdir


def _config(run_dir):
    return json.loads((run_dir / "config.json").read_text())


@pytest.mark.slow
def test_baselines_are_rows_of_the_report(sweep):
    text = (sweep / "results.md").read_text()
    for label in ("| N = 2 |", "| transformer (attention only, full context) |",
                  "| hybrid, no eviction (full context) |", "| N = 1, compute-matched to N = 2 |"):
        assert label in text, label
    transformer, hybrid = _config(sweep / "transformer_seed0")["model"], _config(sweep / "no_eviction_seed0")["model"]
    seq_len = json.loads((sweep / "N2_seed0" / "results.json").read_text())["tokens"] // (2 * 4)  # steps x batch
    trained = _config(sweep / "N2_seed0")["model"]["layers"]
    assert "gdn" in trained
    assert transformer["layers"] == ["attn"] * len(trained) and transformer["window"] == seq_len
    assert hybrid["layers"] == trained and hybrid["window"] == seq_len
    assert _config(sweep / "N2_seed0")["model"]["eviction"] == "sliding"


@pytest.mark.slow
def test_compute_matched_run_trains_for_the_flops_of_n(sweep):
    """Depo micro: the 24-token graph window sleeps, the question windows wake: N = 2 costs (2 + w) / (1 + w) of
    N = 1's layer passes, so the matched run takes proportionally more steps."""
    matched = _config(sweep / "N1_flopsN2_seed0")
    assert matched["model"]["sleep_n"] == 1
    windows = -(-json.loads((sweep / "N2_seed0" / "results.json").read_text())["tokens"] // 8 // 24)
    wakes = windows - 1
    assert matched["train"]["steps"] == int(np.ceil(2 * (2 + wakes) / (1 + wakes)))


@pytest.mark.slow
def test_eval_at_other_n(sweep):
    """Trained checkpoints scored at N = 1 and 3 (same weights); the table is in results.md."""
    result = json.loads((sweep / "N2_seed0" / "eval_sleep_n.json").read_text())
    assert result["trained_n"] == 2 and sorted(result["by_n"]) == ["1", "3"]
    assert all("exact/k=1" in m for m in result["by_n"].values())
    assert "| N = 2 | 0 | 3 |" in (sweep / "results.md").read_text()
    assert not (sweep / "transformer_seed0" / "eval_sleep_n.json").exists()


@pytest.mark.slow
def test_gsm_launcher_fine_tunes_a_pretrained_hybrid(tmp_path):
    """config.train.init_from a tiny Qwen3.5 checkpoint: the launcher tokenizes GSM-Infinite with the checkpoint's
    tokenizer, sleeps with N = 2 over the middle layers, prints the model size and memory estimate, and trains."""
    fixture = REPO / "tests" / "fixtures" / "qwen3_5_text"
    env = {**os.environ, "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false", "JAX_PLATFORMS": "cpu"}
    train = dict(init_from=fixture, steps=2, batch_size=2, eval_size=2, eval_every=2, checkpoint_every=2, log_every=1,
                 warmup_steps=1)
    task = dict(op_max=2, context_len=512, window=128, layout="stream")
    out = subprocess.run([sys.executable, "-m", "experiments.gsm_infinite", "--sleep_n=2",
                          "--config.model.sleep_layers=1,3", *[f"--config.train.{k}={v}" for k, v in train.items()],
                          *[f"--config.task.{k}={v}" for k, v in task.items()], f"--workdir={tmp_path}"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "model: " in out.stdout and "temporaries" in out.stdout
    config = _config(tmp_path)
    assert config["task_options"]["tokenizer"] == str(fixture) and config["model"]["vocab_size"] == 128
    assert config["model"]["sleep_layers"] == [1, 3] and config["model"]["attn_output_gate"]
    assert json.loads((tmp_path / "results.json").read_text())["steps"] == 2
