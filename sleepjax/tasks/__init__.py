"""Tasks: ``sleepjax.tasks.get(name, **options) -> Task``. See ``base.py`` for the layout conventions."""

from __future__ import annotations

import importlib

from sleepjax.tasks.base import Example, Task, check_example, example_rng, stack

# name -> "module:class"; imported lazily so one task's import cost is not paid by the others.
_REGISTRY = {
    "rule110": "sleepjax.tasks.rule110:Rule110",
    "depo": "sleepjax.tasks.depo:Depo",
    "gsm_infinite": "sleepjax.tasks.gsm_infinite:GSMInfinite",
    "text": "sleepjax.tasks.text:Text",  # your own data: JSONL prompt/answer records or plain text
}

NAMES = tuple(_REGISTRY)


def get(name: str, **options) -> Task:
    """Builds task ``name`` with ``options`` (each task validates its own options; the ones not given take the
    class's defaults; the launchers' settings are in experiments/configs/)."""
    if name not in _REGISTRY:
        raise ValueError(f"task must be one of {NAMES}, got {name!r}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)(**options)


__all__ = ["Example", "Task", "NAMES", "get", "check_example", "example_rng", "stack"]
