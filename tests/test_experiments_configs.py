"""The config files (experiments/configs/): every preset builds exactly the (task, ModelConfig, TrainConfig) the
launchers built before the config files existed, and every section holds every field of its target. The command
line (overrides, removed flags, --help, usage errors) is tested in test_experiments_common.py and
test_experiments_launchers.py."""

import dataclasses
import importlib
import inspect
import json
from pathlib import Path

import pytest

from experiments import common
from experiments.configs import common as config_common
from sleepjax import tasks
from sleepjax.config import ModelConfig
from sleepjax.train import TrainConfig

# Made once with the launchers of commit a5aa1d7 (their Preset tables and task-level presets), before the config
# files replaced them: {task: {preset: config.json's task, task_options, model, train}} of common.build(...,
# RunSpec(sleep_n=1, seed=0)).
EXPECTED = json.loads((Path(__file__).parent / "fixtures" / "launcher_presets.json").read_text())
CASES = [(task_name, preset) for task_name, presets in EXPECTED.items() for preset in presets]
# Deliberate changes since the fixture. Issue 19: the sliding preset trains the paper's recipe, 3 epochs over a
# fixed set with the first as the hard-eviction warm-up (steps and warm-up steps follow from them).
CHANGED = {("gsm_infinite", "paper_sliding"): {"train": dict(train_examples=1_600_000, epochs=3, warmup_epochs=1,
                                                             steps=18_750, warmup_eviction_steps=6_250)},
           # issue 21: the Depo main job at half the rates, validated on fresh seeds (docs/depo_half_rates_fresh.md)
           ("depo", "tiny"): {"train": dict(muon_lr=0.01, adam_lr=1.5e-3)}}


def config_module(task_name):
    return importlib.import_module(f"experiments.configs.{task_name}")


def test_every_preset_is_in_the_fixture():
    """Every preset but the fine-tuning ones added since (tests/test_experiments_paper_runs.py)."""
    for task_name, presets in EXPECTED.items():
        module = config_module(task_name)
        assert set(module.PRESETS) - set(getattr(module, "REQUIRED_CHECKPOINT", {})) == set(presets)


@pytest.mark.parametrize("task_name,preset", CASES)
def test_preset_builds_what_the_old_launcher_built(task_name, preset):
    task, model_cfg, train_cfg = common.build(task_name, config_module(task_name).get_config(preset),
                                              common.RunSpec(sleep_n=1, seed=0))
    got = {"task": task.name, "task_options": task.options, "model": dataclasses.asdict(model_cfg),
           "train": dataclasses.asdict(train_cfg)}
    got, expected = json.loads(json.dumps(got)), EXPECTED[task_name][preset]
    for section, fields in CHANGED.get((task_name, preset), {}).items():
        expected = {**expected, section: {**expected[section], **fields}}
    # Fields added after the fixture was made must be at their defaults (the old launchers could not set them).
    defaults = {"model": ModelConfig(), "train": TrainConfig()}
    for section, target in defaults.items():
        for name in set(got[section]) - set(expected[section]):
            assert got[section].pop(name) == json.loads(json.dumps(getattr(target, name))), (section, name)
    new_options = set(got["task_options"]) - set(expected["task_options"])
    for name in new_options:  # task options added since (e.g. the benchmark source) must be off
        assert got["task_options"].pop(name) in (None, 0, ""), name
    assert got == expected


@pytest.mark.parametrize("task_name,preset", CASES)
def test_sections_hold_every_field_of_their_target(task_name, preset):
    config = config_module(task_name).get_config(preset)
    assert list(config.keys()) == ["model", "task", "train"]
    assert list(config.model.keys()) == [f.name for f in dataclasses.fields(ModelConfig)]
    assert list(config.train.keys()) == [f.name for f in dataclasses.fields(TrainConfig)]
    task_class = type(tasks.get(task_name, **config.task.to_dict()))
    assert list(config.task.keys()) == list(inspect.signature(task_class).parameters)
    assert config.model.vocab_size is None and config.model.window is None  # the task's


def test_run_and_baselines_replace_n_seed_window():
    config = config_module("depo").get_config("tiny")
    _, model_cfg, train_cfg = common.build("depo", config, common.RunSpec(sleep_n=3, seed=7))
    assert model_cfg.sleep_n == 3 and train_cfg.seed == 7 and model_cfg.window == 24
    task, model_cfg, _ = common.build("depo", config, common.RunSpec(1, 0, baseline="transformer"))
    assert model_cfg.layers == ("attn", "attn") and model_cfg.window == task.seq_len


def test_sizes_are_valid_models():
    for size in config_common.SIZES:
        fields = config_common.model(size).to_dict()
        ModelConfig(**{**fields, "vocab_size": 10, "window": 8})
    assert config_common.model("depo_paper").layers == ("attn", "gdn") * 5
    with pytest.raises(ValueError, match="d_modle"):
        config_common.model("tiny", d_modle=3)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="preset must be one of .*tiny_k4"):
        config_module("depo").get_config("huge")
