"""Training harness: the loss falls, SIGKILL + resume is bitwise identical, NaN stops the run, evaluation and
reports are right, bad settings fail early."""

import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sleepjax
from helpers.compare import assert_bitwise_equal
from helpers.runs import MICRO, checkpoint_params, finished_checkpoints, micro_setup, wait_for_step, without_timing
from sleepjax import optim, tasks
from sleepjax.evaluate import evaluate
from sleepjax.metrics_log import read_metrics
from sleepjax.train import TrainConfig, load_run, train

REPO = Path(__file__).resolve().parents[1]


def test_training_lowers_the_loss_and_writes_outputs(tmp_path):
    task, model_cfg, train_cfg = micro_setup()
    results = train(task, model_cfg, train_cfg, tmp_path, log_enabled=True)
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert rows[0]["step"] == 5 and rows[-1]["step"] == 40 and all("loss" in r for r in rows)
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"], [r["loss"] for r in rows]
    evals = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [20, 40] and "exact/t=1" in evals[-1]
    assert json.loads((tmp_path / "results.json").read_text())["final_eval"] == results["final_eval"]
    assert any((tmp_path / "tb").iterdir()), "TensorBoard event files"
    params, cfg2, train2, task2 = load_run(tmp_path)
    assert cfg2 == model_cfg and train2 == train_cfg and task2.seq_len == task.seq_len
    assert sleepjax.num_params(params) == results["num_params"]


def _launcher(workdir, steps):
    train = dict(steps=steps, batch_size=16, eval_size=16, eval_every=100000, checkpoint_every=10, log_every=1,
                 warmup_steps=5)
    return [sys.executable, "-m", "experiments.rule110", "--config.task.width=6", "--config.task.strings=2",
            "--config.task.t=1", "--sleep_n=2", f"--workdir={workdir}"] + [
        f"--config.train.{k}={v}" for k, v in train.items()] + [f"--config.model.{k}={v!r}" for k, v in MICRO.items()]


LAUNCH_STEPS = 150


@pytest.fixture(scope="module")
def clean_launch(tmp_path_factory, launcher_env):
    """The launcher's run, never interrupted: the reference of the kill and preemption tests."""
    clean = tmp_path_factory.mktemp("clean")
    done = subprocess.run(_launcher(clean, LAUNCH_STEPS), cwd=REPO, env=launcher_env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return dict(params=checkpoint_params(clean), rows=read_metrics(clean / "metrics.jsonl"))


@pytest.mark.slow
def test_sigkill_and_resume_is_bitwise_identical(tmp_path, launcher_env, clean_launch):
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_launcher(killed, LAUNCH_STEPS), cwd=REPO, env=launcher_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for_step([proc], killed, 1, past_a_checkpoint=True)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert finished_checkpoints(killed), "no checkpoint had finished before the kill"
    assert read_metrics(killed / "metrics.jsonl")[-1]["step"] < LAUNCH_STEPS
    resumed = subprocess.run(_launcher(killed, LAUNCH_STEPS), cwd=REPO, env=launcher_env, capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from the checkpoint at step" in resumed.stdout
    assert_bitwise_equal(checkpoint_params(killed), clean_launch["params"])
    assert without_timing(read_metrics(killed / "metrics.jsonl")) == without_timing(clean_launch["rows"]), \
        "the resumed log must read like one uninterrupted run"


@pytest.mark.slow
def test_sigterm_exits_75_after_a_checkpoint_and_resumes_bitwise(tmp_path, launcher_env, clean_launch):
    workdir = tmp_path / "preempted"
    proc = subprocess.Popen(_launcher(workdir, LAUNCH_STEPS), cwd=REPO, env=launcher_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    signalled = random.randrange(2, LAUNCH_STEPS // 2)
    wait_for_step([proc], workdir, signalled)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, f"SIGTERM near step {signalled}: exit {proc.returncode}\n{err[-2000:]}"
    saved = int(re.search(r"preempted: saved the checkpoint at step (\d+) in \S+; exit code 75", out).group(1))
    assert saved >= signalled and saved in finished_checkpoints(workdir), (signalled, saved)
    assert read_metrics(workdir / "metrics.jsonl")[-1]["step"] == saved
    assert "Traceback" not in err, err[-2000:]
    resumed = subprocess.run(_launcher(workdir, LAUNCH_STEPS), cwd=REPO, env=launcher_env, capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from the checkpoint at step {saved}" in resumed.stdout
    assert_bitwise_equal(checkpoint_params(workdir), clean_launch["params"], f"SIGTERM at step {signalled}")
    assert without_timing(read_metrics(workdir / "metrics.jsonl")) == without_timing(clean_launch["rows"])


@pytest.mark.parametrize("checkpoint_every", [pytest.param(1, marks=pytest.mark.slow), 100])
def test_nan_loss_stops_with_the_step_and_names_the_last_checkpoint_or_none(tmp_path, checkpoint_every):
    task, model_cfg, train_cfg = micro_setup(optimizer="adamw", adam_lr=1e30, grad_clip=0.0,
                                             checkpoint_every=checkpoint_every, warmup_steps=0, lr_schedule="constant")
    with pytest.raises(FloatingPointError, match=r"loss is (nan|inf) at step (\d+): stopping. ") as stop:
        train(task, model_cfg, train_cfg, tmp_path)
    saved = finished_checkpoints(tmp_path)
    if checkpoint_every == 1:  # a checkpoint every step: the one before the NaN, named, finite
        assert saved and max(saved) < train_cfg.steps
        assert f"The last good checkpoint (step {max(saved)}) is kept" in str(stop.value)
        params = load_run(tmp_path)[0]
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(params))
    else:  # none yet: say so (not "step None")
        assert not saved and "No checkpoint was saved before it" in str(stop.value)
        assert "None" not in str(stop.value)


@pytest.mark.slow
def test_evaluate_counts_items_by_hand():
    task, model_cfg, _ = micro_setup()
    params = sleepjax.init(model_cfg, jax.random.PRNGKey(3))
    batches = task.eval_set(7, 10, 4)
    metrics = evaluate(params, batches, num_items=task.num_items, difficulty_name="t")
    right = []
    for b in batches:
        logits = sleepjax.forward(params, jnp.asarray(b["tokens"]), jnp.asarray(b["loss_mask"]))
        pred = np.asarray(jnp.argmax(logits, -1))[:, :-1]
        target = b["tokens"][:, 1:]
        for i in range(len(pred)):
            pos = b["item"][i, :-1] == 0
            right.append(bool(np.all(pred[i][pos] == target[i][pos])))
    assert metrics["items"] == 10 and abs(metrics["exact"] - np.mean(right)) < 1e-9
    assert metrics["exact/t=1"] == metrics["exact"]


def test_muon_applies_to_hidden_matrices_only():
    _, model_cfg, _ = micro_setup()
    params = sleepjax.init(model_cfg, jax.random.PRNGKey(0))
    labels = optim.hidden_matrix_labels(params)
    assert not labels.embed and not labels.unembed and not labels.final_norm
    assert labels.layers[0]["wq"] and labels.layers[0]["mlp"]["w_down"] and labels.layers[1]["w_qkv"]
    assert not labels.layers[1]["conv"] and not labels.layers[1]["a_log"] and not labels.layers[0]["norm1"]


@pytest.mark.parametrize("field,value,match", [
    ("steps", 0, "steps must be an int >= 1"),
    ("optimizer", "sgd", "optimizer must be one of"),
    ("lr_schedule", "step", "lr_schedule must be one of"),
    ("muon_lr", -1.0, "muon_lr must be > 0"),
])
def test_train_config_validation(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{field: value})


def test_workdir_and_mesh_errors(tmp_path):
    task, model_cfg, train_cfg = micro_setup()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="workdir .* is not writable"):
        train(task, model_cfg, train_cfg, blocker / "run")
    with pytest.raises(ValueError, match="mesh.*uses 3 devices"):
        train(task, model_cfg, TrainConfig(mesh="data:3"), tmp_path / "m")
    with pytest.raises(ValueError, match="vocab_size"):
        train(task, model_cfg.replace(vocab_size=99), train_cfg, tmp_path / "v")



def test_check_workdir_is_safe_when_processes_share_the_workdir(tmp_path):
    """Every process of a multi-host run probes the same workdir at start; one probe must not delete another's."""
    code = "import sys; from sleepjax.train import check_workdir; [check_workdir(sys.argv[1]) for _ in range(300)]"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "shared")], cwd=REPO,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(errors)[-2000:]
