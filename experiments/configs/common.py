"""What the config files share: the model sizes, the sections' defaults, the preset check.

A config file (``experiments/configs/<task>.py``) has ``get_config(preset)`` returning a ConfigDict of three
sections, each the keyword arguments of one validated target (a bad value raises its ValueError at start):

    model   sleepjax.ModelConfig       every field; vocab_size and window None = the task's
    train   sleepjax.train.TrainConfig every field
    task    the task's class           every option (sleepjax/tasks/<task>.py)

The launcher overrides any field: ``--config.train.steps=100 --config.model.d_model=128 --config.task.t=8``.
A tuple field takes a Python literal, ``--config.model.layers="('attn', 'gdn')"`` or
``--config.model.sleep_layers=7,21``; a field that is None here takes a value of its type.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import ml_collections as mlc
from ml_collections import config_dict

# ModelConfig's defaults are the tiny model (d = 64, attn-gdn-attn-gdn: CPU scale); the others change its sizes.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {},
    # the paper's Rule 110 model (d = 256, 4 layers), also the GSM-Infinite model trained from scratch
    "paper": dict(d_model=256, attn_heads=4, attn_kv_heads=4, attn_head_dim=64, gdn_heads=4, gdn_value_heads=4,
                  gdn_key_dim=64, gdn_value_dim=64, mlp_dim=1024),
    # the paper's Depo model (10 layers, d = 512)
    "depo_paper": dict(d_model=512, layers=("attn", "gdn") * 5, attn_heads=8, attn_kv_heads=8, attn_head_dim=64,
                       gdn_heads=8, gdn_value_heads=8, gdn_key_dim=64, gdn_value_dim=64, mlp_dim=2048),
}

# Fields that may be None, and the type a command-line override of them is parsed as.
_OPTIONAL_TYPES = {"vocab_size": int, "window": int, "sleep_layers": tuple, "rope_dim": int, "tokenizer": str,
                  "swa_window": int,
                  "benchmark_path": str, "benchmark_train_path": str, "benchmark_template": str,
                  "benchmark_mode": str}


def model(size: str = "tiny", **fields: Any) -> mlc.ConfigDict:
    """Every ModelConfig field: its default, then the size's, then ``fields``. vocab_size and window stay None
    unless given: the launcher then takes the task's vocabulary and window."""
    from sleepjax.config import ModelConfig

    return _section(ModelConfig, {**SIZES[size], "vocab_size": None, "window": None, **fields})


def train(**fields: Any) -> mlc.ConfigDict:
    """Every TrainConfig field: its default, then ``fields``."""
    from sleepjax.train import TrainConfig

    return _section(TrainConfig, fields)


# Fine-tuning rates: what a run with train.init_from on a from-scratch preset (tiny, paper, ...) trains at, for
# each of these fields the command line does not set (the launcher says so on one line). The from-scratch rates
# (Muon 0.02, AdamW 3e-3 in the tiny presets) wreck a pretrained model in a few steps. Muon 1e-3 and AdamW 5e-5 are
# the paper's fine-tuning rates (the gsm_infinite paper_* fine-tuning presets, which keep their own); the warm-up
# is FINETUNE_WARMUP_FRACTION of the run's steps (at least 1).
FINETUNE_RATES: dict[str, Any] = {"muon_lr": 1e-3, "adam_lr": 5e-5, "warmup_steps": None}
FINETUNE_WARMUP_FRACTION = 0.05


def finetune_rate(name: str, steps: int) -> Any:
    """The fine-tuning default of ``name`` (a key of FINETUNE_RATES) for a run of ``steps`` steps."""
    if name == "warmup_steps":
        return max(1, round(FINETUNE_WARMUP_FRACTION * steps))
    return FINETUNE_RATES[name]


REQUIRED = "REQUIRED: "


def required(what: str) -> str:
    """The value of a field the command line must set (a fine-tuning preset's init_from): the launcher stops
    before any work and says which ``--config.`` override it needs and what it holds."""
    return REQUIRED + what


def either(value: Any) -> config_dict.FieldReference:
    """A field that is an int or a (lo, hi) pair: a command-line override is read as a Python literal."""
    return config_dict.FieldReference(value, field_type=object)


def task(**options: Any) -> mlc.ConfigDict:
    """The task section: every option, spelled out by the config file."""
    return mlc.ConfigDict({k: _typed(k, v) for k, v in options.items()}, sort_keys=False)


def task_options(task_name: str, preset: str) -> dict[str, Any]:
    """The task options of a launcher preset, for scripts that build a task themselves (bench/)."""
    return importlib.import_module(f"experiments.configs.{task_name}").get_config(preset).task.to_dict()


def preset(arg: str | None, presets: dict[str, str]) -> str:
    """The preset ``get_config(arg)`` builds: ``arg``, or the first one (the default) when there is none."""
    name = arg or next(iter(presets))
    if name not in presets:
        raise ValueError(f"preset must be one of {tuple(presets)}, got {name!r}")
    return name


def _section(target, fields: dict[str, Any]) -> mlc.ConfigDict:
    defaults = {f.name: getattr(target(), f.name) for f in dataclasses.fields(target)}
    unknown = set(fields) - set(defaults)
    if unknown:
        raise ValueError(f"unknown {target.__name__} fields {sorted(unknown)}")
    return mlc.ConfigDict({k: _typed(k, v) for k, v in {**defaults, **fields}.items()}, sort_keys=False)


def _typed(name: str, value: Any) -> Any:
    # A bare None has no type, and ml_collections can only override fields whose type it knows.
    return config_dict.placeholder(_OPTIONAL_TYPES[name]) if value is None else value
