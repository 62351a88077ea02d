"""What a launcher promises its user (experiments/common.py): --help lists every flag and exits 0; an error is one
``error: ...`` line before any compiling (a missing or damaged checkpoint, a task setting no example fits);
SIGTERM at any point exits 75 and Ctrl-C 130 (saving the checkpoint once a step is unsaved); init_from on a
from-scratch preset trains at fine-tuning rates, and the log, results.json and results.md name the checkpoint and
the model trained. Subprocess tests that compile are marked slow; the default ones stop before compiling ends."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import common
from experiments.configs import common as config_common, gsm_infinite, rule110
from helpers.runs import MICRO
from sleepjax import report

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
QWEN3 = FIXTURES / "qwen3"
MICRO_FLAGS = [f"--config.model.{k}={v!r}" for k, v in MICRO.items()]
# a micro Rule 110 run: ~3 s of imports and task, then compiling, then steps of a few ms
RULE110 = ["experiments.rule110", "--config.task.width=6", "--config.task.strings=2", "--config.task.t=1",
           "--sleep_n=2", "--config.train.batch_size=16", "--config.train.eval_size=16", "--config.train.log_every=1",
           "--config.train.eval_every=100000", "--config.train.checkpoint_every=100000", *MICRO_FLAGS]
TOY_GSM = ["--config.train.steps=2", "--config.train.batch_size=2", "--config.train.eval_size=2",
           "--config.train.eval_batch_size=2", "--config.train.eval_every=2", "--config.train.checkpoint_every=2",
           "--config.train.log_every=1", "--config.task.op_max=2"]


def env():
    return {**os.environ, "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false", "JAX_PLATFORMS": "cpu"}


def launch(module, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          env=env(), timeout=timeout)


def one_error_line(out, code=2):
    assert out.returncode == code, (out.returncode, out.stdout[-1000:], out.stderr[-2000:])
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr[-2000:]
    return out.stderr


def start(*args):
    return subprocess.Popen([sys.executable, "-m", *RULE110, *args], cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def read_until(proc, prefix, timeout=300):
    """Reads the launcher's stdout until a line starting with ``prefix``; returns the lines read."""
    lines, deadline = [], time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(prefix) or time.time() > deadline:
            break
    assert lines and lines[-1].startswith(prefix), (lines[-5:], proc.poll())
    return lines


# --- --help


# catches --helpfull exiting 1 (absl's) and a help that lists only absl's flags or only the task's
def test_helpfull_exits_0_with_the_launchers_flags_and_absls():
    out = launch("experiments.rule110", "--helpfull", "--config.train.init_from=" + str(QWEN3))
    assert out.returncode == 0, out.stderr[-2000:]
    # the rates the run would use: the fine-tuning defaults, since init_from is given on a from-scratch preset
    for needle in ("--sleep_n", "--sweep_n", "--seeds", "--workdir", "--config.train.muon_lr=0.001", "--verbosity",
                   "Exit codes:", "130", "model_type qwen3, 3 layers"):
        assert needle in out.stdout, needle


# --- errors: one line, before compiling


# catches a missing init_from directory reported as a tokenizer problem (the task reads its tokenizer first)
def test_a_missing_checkpoint_directory_is_named(tmp_path):
    out = launch("experiments.gsm_infinite", f"--config.train.init_from={tmp_path / 'nowhere'}",
                 f"--workdir={tmp_path / 'w'}")
    assert "config.train.init_from=" in one_error_line(out) and "no such directory" in out.stderr


# catches a truncated model.safetensors that fails as a 20-line traceback after compiling (or loads garbage)
@pytest.mark.parametrize("damage", ["header", "data", "index", "shard"])
def test_a_damaged_checkpoint_is_one_error_before_any_work(tmp_path, damage):
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes((QWEN3 / name).read_bytes())
    data = (QWEN3 / "model.safetensors").read_bytes()
    if damage in ("header", "data"):
        (tmp_path / "model.safetensors").write_bytes(data[:3000] if damage == "header" else data[:-100])
        needle = "model.safetensors is damaged or cut short"
    else:
        (tmp_path / "model.safetensors.index.json").write_text(
            "{not json" if damage == "index" else json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
        needle = "is not a safetensors index" if damage == "index" else "model-00001-of-00002.safetensors is missing"
    with pytest.raises(ValueError, match=needle):
        common.check_checkpoint(str(tmp_path))
    common.check_checkpoint(str(QWEN3))  # the whole fixture passes


# catches "no problem fits context_len" coming after compiling (43 s) as a traceback instead of at build time
def test_a_task_setting_no_example_fits_fails_before_compiling(tmp_path):
    out = launch("experiments.gsm_infinite", "--config.task.op_min=20", "--config.task.op_max=30",
                 "--config.task.places=4", "--config.task.categories=4", f"--workdir={tmp_path}")
    assert "no problem with op=20 within context_len=128" in one_error_line(out)
    assert "model:" not in out.stdout, "the memory estimate comes after compiling: the error must come first"


# catches a config field named like a ConfigDict method (task.items) failing with a dump of the whole config
def test_a_field_the_command_line_cannot_override_is_one_clear_error():
    config = gsm_infinite.get_config("tiny")
    assert "items" in config.task
    with pytest.raises(common.flags.Error, match="cannot override a field named 'items'"):
        common._check_overrides(["--config.task.items=4"], f"{gsm_infinite.__file__}:tiny")


# --- signals


# catches SIGTERM during startup / compiling exiting 143 with no message (the documented requeue code is 75)
def test_sigterm_while_compiling_exits_75_at_once(tmp_path):
    proc = start("--config.train.steps=50", f"--workdir={tmp_path}")
    read_until(proc, "rule110:")  # printed just before train(): restoring, compiling
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, (proc.returncode, err[-2000:])
    assert time.time() - sent < 20, "the compile must not delay the exit"
    assert "preempted (SIGTERM): nothing to save yet" in err and "Traceback" not in err, err[-2000:]


# catches Ctrl-C while starting up printing a KeyboardInterrupt traceback instead of one line and exit 130
@pytest.mark.slow
def test_ctrl_c_while_starting_exits_130_with_one_line(tmp_path):
    proc = start("--config.train.steps=50", f"--workdir={tmp_path}")
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.count("\n") == 1 and "interrupted (Ctrl-C)" in err, (proc.returncode, err)


# catches Ctrl-C during training that saves nothing and prints a traceback (a resumed run restarts from 0)
@pytest.mark.slow
def test_ctrl_c_while_training_saves_the_checkpoint_and_exits_130(tmp_path):
    proc = start("--config.train.steps=100000", f"--workdir={tmp_path}")
    read_until(proc, "step 3/")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert "Traceback" not in err and "interrupted: saved the checkpoint at step" in out, (out[-500:], err[-500:])
    step = int(out.split("interrupted: saved the checkpoint at step ")[1].split()[0])
    assert (tmp_path / "checkpoints" / str(step)).is_dir()


# catches a parallel sweep's parent that dies at SIGTERM (exit 143) leaving its runs, or exits before they saved
@pytest.mark.slow
def test_sigterm_to_a_parallel_sweep_stops_every_run_with_its_checkpoint(tmp_path):
    cmd = [sys.executable, "-m", "experiments.depo", "--sweep_n=1,2", "--parallel=2", "--config.task.max_hops=2",
           "--config.task.questions=4", "--config.train.steps=100000", "--config.train.batch_size=4",
           "--config.train.eval_size=4", "--config.train.eval_every=100000", "--config.train.log_every=1",
           "--config.train.checkpoint_every=100000", *MICRO_FLAGS, f"--workdir={tmp_path}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logs = [tmp_path / f"N{n}_seed0" / "log.txt" for n in (1, 2)]
    deadline = time.time() + 400
    while not all(log.exists() and "step 2/" in log.read_text() for log in logs):
        assert time.time() < deadline and proc.poll() is None, proc.poll()
        time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=200)
    assert proc.returncode == 75, (proc.returncode, out[-2000:], err[-2000:])
    for log in logs:
        assert "preempted: saved the checkpoint at step" in log.read_text(), log.read_text()[-1000:]
    assert "stopped (exit 75)" in out and "Traceback" not in err


# catches the launcher's signal exit codes drifting from sleepjax.train's (the handlers run before JAX loads)
def test_the_launchers_exit_codes_are_the_trainers():
    from sleepjax.train import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE

    assert common.STOP_EXIT_CODES == {signal.SIGTERM: PREEMPTED_EXIT_CODE, signal.SIGINT: INTERRUPTED_EXIT_CODE}


# --- fine-tuning: rates, and the checkpoint named


# catches an init_from run that silently keeps the from-scratch preset's rates (0.02 / 3e-3 wreck a checkpoint)
def test_init_from_on_a_from_scratch_preset_takes_fine_tuning_rates():
    config, preset = rule110.get_config("tiny"), rule110.get_config("tiny")
    config.train.init_from = str(QWEN3)
    origins = common.finetune_rates(config, preset, ["--config.train.init_from=x", "--config.train.adam_lr=1e-4"])
    assert origins == {"muon_lr": "default", "adam_lr": "given", "warmup_steps": "default"}
    assert config.train.muon_lr == config_common.FINETUNE_RATES["muon_lr"] == 1e-3
    assert config.train.adam_lr == 3e-3  # given on the command line (here: the config's value stays)
    assert config.train.warmup_steps == round(0.05 * preset.train.steps)
    # a fine-tuning preset keeps its own rates; no init_from: nothing changes
    ouro = gsm_infinite.get_config("paper_ouro")
    ouro.train.init_from = str(QWEN3)
    assert set(common.finetune_rates(ouro, gsm_infinite.get_config("paper_ouro"), []).values()) == {"preset"}
    assert (ouro.train.muon_lr, ouro.train.warmup_steps) == (1e-3, 100)
    scratch = rule110.get_config("tiny")
    assert common.finetune_rates(scratch, preset, []) == {} and scratch.train.muon_lr == 0.02


# catches results.md that never names the checkpoint, or names the preset's layers instead of the loaded ones
def test_results_md_names_the_checkpoint_and_its_layers(tmp_path):
    start_from = {"path": "/ckpt/qwen3", "model_type": "qwen3", "layers": ["attn", "gdn", "attn"], "num_layers": 3,
                  "d_model": 24, "vocab_size": 128, "loop_steps": 1, "inserted_layers": 1, "insert_kind": "gdn"}
    final = {"step": 2, "kind": "eval", "sequences": 4, "exact": 0.5, "exact/op=1": 0.5}
    (tmp_path / "N1_seed0").mkdir()
    (tmp_path / "N1_seed0" / "metrics.jsonl").write_text(json.dumps(final) + "\n")
    (tmp_path / "N1_seed0" / "results.json").write_text(json.dumps({
        "sleep_n": 1, "seed": 0, "sequences": 4, "seconds_per_step": 0.1, "wall_clock_s": 1.0,
        "difficulty_name": "op", "final_eval": final, "init_from": start_from,
        "learning_rates": {"optimizer": "muon", "muon_lr": 1e-3, "adam_lr": 5e-5, "warmup_steps": 1}}))
    text = report.write_comparison(tmp_path, [tmp_path / "N1_seed0"])
    assert ("Fine-tuned from `/ckpt/qwen3` (model_type `qwen3`): 3 layers attn, gdn, attn (1 inserted gdn); "
            "d_model 24") in text
    assert "muon_lr 0.001, adam_lr 5e-05, warmup_steps 1" in text


# catches a fine-tuning launch that logs and records the preset's model (layers, width) or not the checkpoint
@pytest.mark.slow
def test_an_init_from_launch_names_the_checkpoint_its_model_and_rates(tmp_path):
    out = launch("experiments.gsm_infinite", *TOY_GSM, f"--config.train.init_from={QWEN3}", f"--workdir={tmp_path}",
                 timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "muon_lr=0.001, adam_lr=5e-05, warmup_steps=1: the fine-tuning defaults" in out.stdout
    assert f"init_from: {QWEN3} (model_type qwen3): 3 layers attn,attn,attn, d_model 24" in out.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["init_from"]["model_type"] == "qwen3" and results["init_from"]["d_model"] == 24
    assert results["learning_rates"]["muon_lr"] == 1e-3
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["train"]["muon_lr"], config["train"]["adam_lr"]) == (1e-3, 5e-5)
