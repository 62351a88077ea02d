"""The text launcher (experiments/text.py, experiments/configs/text.py): its presets build, the fine-tuning preset
needs a checkpoint, and one command per format trains 2 steps on the tiny Qwen3 checkpoint with sleep options
(N = 2, sliding eviction, sleep_layers; plain text with loss_from) and exports to what pretrained.load reads."""

import dataclasses
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import common
from experiments.configs import text as text_configs
from sleepjax import pretrained
from sleepjax.config import ModelConfig
from sleepjax.export import export_run
from sleepjax.tasks.text import Text
from sleepjax.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
DATA = FIXTURES / "text_task"
TOY_TRAIN = dict(steps=2, batch_size=4, eval_batch_size=2, eval_size=2, eval_every=2, checkpoint_every=2,
                 log_every=1, warmup_steps=1, mesh="")


@pytest.mark.parametrize("preset", list(text_configs.PRESETS))
def test_presets_hold_every_field_in_order(preset):
    """Catches a task option missing from the config file (it could not be set from the command line) and
    sections that drift from their targets."""
    config = text_configs.get_config(preset)
    assert list(config.model.keys()) == [f.name for f in dataclasses.fields(ModelConfig)]
    assert list(config.train.keys()) == [f.name for f in dataclasses.fields(TrainConfig)]
    assert list(config.task.keys()) == list(inspect.signature(Text).parameters)
    assert config.model.vocab_size is None and config.model.window is None


def test_build_reads_the_checkpoints_tokenizer_and_refuses_missing_settings():
    """Catches a launcher that tokenizes with bytes although init_from names a checkpoint, a fine-tuning preset
    that starts without one, and a missing train_path reported late or as something else."""
    config = text_configs.get_config("tiny")
    with pytest.raises(ValueError, match="config.task: train_path is required"):
        common.build("text", config, common.RunSpec(sleep_n=1, seed=0))
    config.task.train_path = str(DATA / "qa.jsonl")
    config.task.context_len = 64
    config.train.init_from = str(FIXTURES / "qwen3")
    task, model_cfg, _ = common.build("text", config, common.RunSpec(sleep_n=2, seed=0))
    assert task.options["tokenizer"] == str(FIXTURES / "qwen3") and task.vocab_size == 105
    assert model_cfg.vocab_size == 128 and model_cfg.window == 64 and model_cfg.sleep_n == 2
    finetune = text_configs.get_config("finetune")
    finetune.task.train_path = str(DATA / "qa.jsonl")
    with pytest.raises(ValueError, match=r"--config\.train\.init_from=DIR"):
        common.build("text", finetune, common.RunSpec(sleep_n=1, seed=0))


@pytest.mark.parametrize("data,extra,sleep", [
    ("qa.jsonl", ["--config.task.eval_path=" + str(DATA / "qa_eval.jsonl"), "--config.task.difficulty_field=level",
                  "--config.task.context_len=64", "--config.model.eviction=sliding",
                  "--config.model.sleep_layers=1,3"],
     dict(window=16, sleep_n=2, sleep_layers=(1, 3), eviction="sliding")),
    pytest.param("docs.txt", ["--config.task.context_len=48", "--config.task.loss_from=16",
                              "--config.task.eval_fraction=0.4"],
                 dict(window=16, sleep_n=2, sleep_layers=None, eviction="hard"), marks=pytest.mark.slow),
])
def test_launcher_trains_two_steps_and_exports(tmp_path, data, extra, sleep):
    """Catches a text launcher that does not run end to end with sleep options (schedule, masks, tokenizer from
    init_from), and a run whose export loses the sleep settings."""
    env = {**os.environ, "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "experiments.text", "--config=tiny", f"--config.task.train_path={DATA / data}",
           f"--config.train.init_from={FIXTURES / 'qwen3'}", "--config.task.window=16", "--sleep_n=2",
           *[f"--config.train.{k}={v}" for k, v in TOY_TRAIN.items()], *extra, f"--workdir={tmp_path / 'run'}"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["steps"] == 2 and results["slept_fraction"]["train"] == 1.0
    if data == "docs.txt":  # loss_from = one window: window 0 of every example sleeps
        assert results["sleep_schedule"][0] == "S"
    export_run(tmp_path / "run", tmp_path / "export")
    loaded = pretrained.load(tmp_path / "export")
    assert {k: getattr(loaded.config, k) for k in pretrained.SLEEP_FIELDS} == sleep
    assert (tmp_path / "export" / "tokenizer.json").exists()
