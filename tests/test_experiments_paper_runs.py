"""The paper's GSM-Infinite runs as presets (experiments/configs/gsm_infinite.py): what each one builds from a
checkpoint, that it refuses to start without one, and one command each run end to end at toy size on the tiny
Jet-Nemotron and Ouro fixtures (tests/fixtures/jet_nemotron, tests/fixtures/ouro) with a small tokenizer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import common
from experiments.configs import gsm_infinite

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
# Toy size: short problems in windows of 64, two steps of two sequences, the fixtures' small tokenizer.
TOY_TASK = dict(op_max=2, fill_tokens=0, distractors=1, noise=0, context_len=256, window=64,
                tokenizer=str(FIXTURES / "tokenizer"))
TOY_TRAIN = dict(batch_size=2, eval_size=2, eval_batch_size=2, eval_every=2, checkpoint_every=2, log_every=1,
                 warmup_steps=1, mesh="")


def built(preset, checkpoint, model=(), **train):
    config = gsm_infinite.get_config(preset)
    config.train.init_from = str(checkpoint)
    config.task.update(TOY_TASK)
    config.model.update(dict(model))
    config.train.update(train)
    return common.build("gsm_infinite", config, common.RunSpec(sleep_n=4, seed=0))


def test_fine_tuning_presets_need_a_checkpoint():
    """Catches a preset that starts (and fails later, or trains from scratch) without --config.train.init_from."""
    for preset, what in gsm_infinite.REQUIRED_CHECKPOINT.items():
        with pytest.raises(ValueError, match=r"--config\.train\.init_from=DIR \(" + what):
            common.build("gsm_infinite", gsm_infinite.get_config(preset), common.RunSpec(sleep_n=1, seed=0))


def test_presets_build_the_papers_settings():
    """Catches a preset that loses the paper's setting: Jet-Nemotron's middle sleep layers, Ouro's inserted
    JetBlocks looping with the rest, the sliding recipe's epochs and warm-up (hard eviction, only the new layers)."""
    _, model, train = built("paper_jet_nemotron", FIXTURES / "jet_nemotron", {"sleep_layers": (1, 3)})
    assert gsm_infinite.get_config("paper_jet_nemotron").model.sleep_layers == (7, 21)
    assert model.layers == ("jet", "attn", "swa", "jet") and model.dtype == "bfloat16" and model.remat == "both"
    assert (train.batch_size, train.muon_lr, train.adam_lr, train.mesh) == (256, 1e-3, 5e-5, "fsdp:-1")
    paper = gsm_infinite.get_config("paper_ouro")
    assert (paper.train.insert_gdn, paper.train.insert_kind, paper.model.sleep_layers) == (6, "jet", None)
    _, model, train = built("paper_ouro", FIXTURES / "ouro", insert_gdn=2)
    assert model.layers == ("attn", "jet", "attn", "jet", "attn") and model.loop_steps == 3
    assert model.sleep_layer_range == (0, 15) and model.eviction == "hard" and train.freeze == "none"
    _, model, train = built("paper_ouro_sliding", FIXTURES / "ouro", insert_gdn=2, train_examples=6, batch_size=2)
    assert model.eviction == "sliding" and model.window == 64 and train.freeze == "pretrained"
    assert (train.steps, train.warmup_eviction_steps, train.freeze_steps) == (9, 3, 3)  # 3 epochs, the first warm-up
    scratch = gsm_infinite.get_config("paper_sliding").train
    assert (scratch.train_examples, scratch.epochs, scratch.warmup_epochs) == (1_600_000, 3, 1)


def run_launcher(tmp_path, preset, checkpoint, *extra):
    env = {**os.environ, "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false", "JAX_PLATFORMS": "cpu"}
    task = TOY_TASK
    cmd = [sys.executable, "-m", "experiments.gsm_infinite", f"--config={preset}",
           f"--config.train.init_from={checkpoint}", *[f"--config.train.{k}={v}" for k, v in TOY_TRAIN.items()],
           *[f"--config.task.{k}={v}" for k, v in task.items()], f"--workdir={tmp_path}", *extra]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return json.loads((tmp_path / "results.json").read_text()), json.loads((tmp_path / "config.json").read_text())


@pytest.mark.slow
def test_ouro_sliding_recipe_runs_end_to_end(tmp_path):
    """The paper's sliding run at toy size: Ouro (3 loops) + 2 JetBlocks, 3 epochs of 4 problems, the first with
    only the JetBlocks training under hard eviction. Catches a recipe that does not run or counts its steps wrong."""
    results, config = run_launcher(tmp_path, "paper_ouro_sliding", FIXTURES / "ouro", "--sleep_n=2",
                                   "--config.train.insert_gdn=2", "--config.train.train_examples=4")
    assert results["steps"] == 6 and results["epoch"] == 3.0
    assert config["train"]["freeze_steps"] == 2 and config["train"]["warmup_eviction_steps"] == 2
    assert config["model"]["loop_steps"] == 3 and config["model"]["eviction"] == "sliding"


@pytest.mark.parametrize("preset,checkpoint,extra", [
    ("paper_jet_nemotron", "jet_nemotron", ("--config.model.sleep_layers=1,3",)),
    pytest.param("paper_ouro", "ouro", ("--config.train.insert_gdn=2",), marks=pytest.mark.slow),
])
def test_paper_run_presets_run_end_to_end(tmp_path, preset, checkpoint, extra):
    results, config = run_launcher(tmp_path, preset, FIXTURES / checkpoint, "--sleep_n=2",
                                   "--config.train.steps=2", *extra)
    assert results["steps"] == 2 and config["model"]["sleep_n"] == 2
