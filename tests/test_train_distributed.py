"""Scale-out on one CPU machine: meshes of 8 simulated devices (data / fsdp / tensor) train like one device, a
checkpoint written on one mesh restores on another, and two real processes (jax.distributed over localhost)
train, are killed or preempted (SIGTERM), and resume to the bit."""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers.compare import assert_bitwise_equal
from helpers.runs import MICRO, checkpoint_params, finished_checkpoints, wait_for_step, without_timing
from sleepjax.metrics_log import read_metrics

REPO = Path(__file__).resolve().parents[1]
HEADS4 = dict(MICRO, attn_heads=4, attn_kv_heads=4, gdn_heads=4, gdn_value_heads=4)
# A looped (Ouro-style) model with a JetBlock: its dynamic conv, generator and per-loop carries under a mesh.
JET_LOOP4 = dict(HEADS4, layers=["attn", "jet"], loop_steps=2, sandwich_norm_layers=[0], mlp_free_layers=[1],
                 jet_heads=4, jet_key_dim=8, jet_value_dim=8, jet_conv_reduction=4)

_MESH_SCRIPT = """
import json, sys, numpy as np, jax
import sleepjax
from sleepjax import tasks
from sleepjax.train import TrainConfig, train, load_run
out, meshes, restore_mesh = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
task = tasks.get("rule110", width=6, strings=2, t=1)
model_cfg = sleepjax.ModelConfig(**json.loads(sys.argv[4]), vocab_size=task.vocab_size, window=task.window,
                                 sleep_n=2)
base = dict(steps=4, batch_size=16, muon_lr=0.02, adam_lr=3e-3, warmup_steps=1, eval_every=4, eval_size=16,
            eval_batch_size=16, checkpoint_every=2, log_every=1)
report = {}
for mesh in meshes:
    workdir = f"{out}/{mesh or 'one'}"
    results = train(task, model_cfg, TrainConfig(**base, mesh=mesh), workdir, log_enabled=True)
    losses = [r["loss"] for r in map(json.loads, open(workdir + "/metrics.jsonl")) if r["kind"] == "train"]
    params = [np.asarray(x) for x in jax.tree_util.tree_leaves(load_run(workdir)[0])]
    np.savez(workdir + "/params.npz", *params)
    report[mesh or "one"] = dict(losses=losses, eval_loss=results["final_eval"]["loss"])
if restore_mesh:  # the first run's checkpoint, restored onto another mesh (a finished run is re-evaluated)
    results = train(task, model_cfg, TrainConfig(**base, mesh=restore_mesh), f"{out}/{meshes[0]}")
    report["restored"] = dict(eval_loss=results["final_eval"]["loss"], steps=results["steps"])
print("REPORT" + json.dumps(report))
"""


def run_meshes(tmp_path, devices, meshes, restore_mesh="", model=HEADS4):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    out = subprocess.run([sys.executable, "-c", _MESH_SCRIPT, str(tmp_path), json.dumps(meshes), restore_mesh,
                          json.dumps(model)], cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.split("REPORT")[-1])


@pytest.mark.slow
def test_meshes_match_one_device_and_checkpoints_move_between_meshes(tmp_path):
    one = run_meshes(tmp_path / "single", 1, [""])["one"]
    meshes = ["data:8", "data:2,fsdp:2,tensor:2", "fsdp:2,tensor:4"]
    many = run_meshes(tmp_path / "eight", 8, meshes, restore_mesh="fsdp:4,tensor:2")
    reference = np.load(tmp_path / "single" / "one" / "params.npz")
    for mesh in meshes:
        np.testing.assert_allclose(many[mesh]["losses"], one["losses"], rtol=2e-5, err_msg=mesh)
        params = np.load(tmp_path / "eight" / mesh / "params.npz")
        for key in reference.files:
            np.testing.assert_allclose(params[key], reference[key], rtol=2e-4, atol=2e-6, err_msg=mesh)
    restored = many["restored"]
    assert restored["steps"] == 4
    np.testing.assert_allclose(restored["eval_loss"], many["data:8"]["eval_loss"], rtol=1e-5)


@pytest.mark.slow
def test_a_looped_jet_model_on_a_mesh_trains_like_one_device(tmp_path):
    """Catches a JetBlock or loop weight sharded wrongly (tensor axis over its heads, fsdp over d)."""
    one = run_meshes(tmp_path / "single", 1, [""], model=JET_LOOP4)["one"]
    many = run_meshes(tmp_path / "eight", 8, ["fsdp:2,tensor:4"], model=JET_LOOP4)
    np.testing.assert_allclose(many["fsdp:2,tensor:4"]["losses"], one["losses"], rtol=2e-5)
    reference = np.load(tmp_path / "single" / "one" / "params.npz")
    params = np.load(tmp_path / "eight" / "fsdp:2,tensor:4" / "params.npz")
    for key in reference.files:
        np.testing.assert_allclose(params[key], reference[key], rtol=2e-4, atol=2e-6, err_msg=key)


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch_job(workdir, steps, port, env, processes=2):
    """The Rule 110 launcher as a job of two processes (one CPU device each), or of one process (no coordinator)."""
    train = dict(steps=steps, batch_size=16, eval_size=16, eval_every=100000, checkpoint_every=4, log_every=1,
                 warmup_steps=2)
    flags = ["--config.task.width=6", "--config.task.strings=2", "--config.task.t=1", "--sleep_n=2",
             f"--workdir={workdir}", *[f"--config.train.{k}={v}" for k, v in train.items()]]
    flags += [f"--config.model.{k}={v!r}" for k, v in MICRO.items()]
    if processes == 1:
        return [subprocess.Popen([sys.executable, "-m", "experiments.rule110", *flags], cwd=REPO, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    flags += [f"--coordinator_address=localhost:{port}", f"--num_processes={processes}"]
    return [subprocess.Popen([sys.executable, "-m", "experiments.rule110", *flags, f"--process_id={i}"], cwd=REPO,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(processes)]


TWO_STEPS = 40


def _finish_two(procs, timeout=300):
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    return outputs


@pytest.fixture(scope="module")
def clean_two(tmp_path_factory, launcher_env):
    """Two processes, never interrupted: the reference of the kill and preemption tests."""
    workdir = tmp_path_factory.mktemp("clean_two")
    _finish_two(_launch_job(workdir, TWO_STEPS, _free_port(), launcher_env))
    return dict(params=checkpoint_params(workdir), rows=read_metrics(workdir / "metrics.jsonl"))


@pytest.mark.slow
def test_two_processes_train_like_one_process_on_the_same_global_batch(tmp_path, launcher_env, clean_two):
    """Two processes (each building its half of every global batch) end where one process feeding the whole
    batch does: train losses and parameters to float tolerance. Catches every process feeding the same rows
    (duplicated data, half the effective batch), rows dropped or a process's shard placed in the other's slot
    (the other two-process tests compare a two-process run only with itself)."""
    single = _launch_job(tmp_path, TWO_STEPS, _free_port(), launcher_env, processes=1)
    _finish_two(single)
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    two_rows = [r for r in clean_two["rows"] if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [r["step"] for r in two_rows]
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in two_rows], rtol=1e-4)
    for a, b in zip(checkpoint_params(tmp_path), clean_two["params"]):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_two_processes_train_die_and_resume(tmp_path, launcher_env, clean_two):
    workdir = tmp_path / "run"
    procs = _launch_job(workdir, TWO_STEPS, _free_port(), launcher_env)
    wait_for_step(procs, workdir, 1, past_a_checkpoint=True)  # process 1 "dies" once training is past a checkpoint
    os.kill(procs[1].pid, signal.SIGKILL)
    os.kill(procs[0].pid, signal.SIGKILL)  # what a job scheduler does with the rest of a broken job
    for p in procs:
        p.wait()
    assert finished_checkpoints(workdir), "no checkpoint had finished before the kill"
    assert read_metrics(workdir / "metrics.jsonl")[-1]["step"] < TWO_STEPS

    outputs = _finish_two(_launch_job(workdir, TWO_STEPS, _free_port(), launcher_env))  # the same command again
    assert "resumed from the checkpoint at step" in outputs[0]
    results = json.loads((workdir / "results.json").read_text())
    assert results["steps"] == TWO_STEPS and results["devices"] == 2
    assert without_timing(read_metrics(workdir / "metrics.jsonl")) == without_timing(clean_two["rows"])
    assert_bitwise_equal(checkpoint_params(workdir), clean_two["params"])
    assert not any(line.startswith("step ") for line in outputs[1].splitlines()), "only process 0 logs"


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes_bitwise(tmp_path, launcher_env, clean_two):
    """The preemption notice reaches one host; JAX's preemption sync point stops every process at the same step,
    all of them save it and exit 75, and the relaunched job is the uninterrupted one."""
    workdir = tmp_path / "run"
    procs = _launch_job(workdir, TWO_STEPS, _free_port(), launcher_env)
    signalled = random.randrange(2, TWO_STEPS - 10)
    wait_for_step(procs, workdir, signalled)
    os.kill(procs[1].pid, signal.SIGTERM)
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [75, 75], \
        f"SIGTERM near step {signalled}\n" + outputs[0][-3000:] + outputs[1][-3000:]
    saved = int(re.search(r"preempted: saved the checkpoint at step (\d+)", outputs[0]).group(1))
    assert saved >= signalled and saved in finished_checkpoints(workdir), (signalled, saved)
    assert read_metrics(workdir / "metrics.jsonl")[-1]["step"] == saved

    outputs = _finish_two(_launch_job(workdir, TWO_STEPS, _free_port(), launcher_env))
    assert f"resumed from the checkpoint at step {saved}" in outputs[0]
    assert without_timing(read_metrics(workdir / "metrics.jsonl")) == without_timing(clean_two["rows"])
    assert_bitwise_equal(checkpoint_params(workdir), clean_two["params"], f"SIGTERM near step {signalled}")
