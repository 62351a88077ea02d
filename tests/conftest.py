"""Fixtures. Helpers the tests share live in tests/helpers/ (``from helpers.compare import rel_err``); this
directory is put on sys.path here, so that they import the same way under ``python -m pytest`` from the
repository root, ``pytest tests/x.py`` and any --import-mode."""

import glob
import os
import sys
from pathlib import Path

import pytest

TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (the README's test command): one test process per core, at most 4 (each is a JAX process of a
    few GB). None besides the main one where JAX would see an accelerator: processes would compete for it."""
    told_cpu = os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu"
    devices = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")  # NVIDIA GPU, TPU (two drivers)
    if not told_cpu and any(glob.glob(pattern) for pattern in devices):
        return 0
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def pytest_configure(config):
    """``-n`` without ``--dist``: each module's tests on one process (``loadscope``), so that a module-scoped
    fixture (a trained run, a built model) is built once, not once per process."""
    given = any(a == "--dist" or a.startswith("--dist=") for a in config.invocation_params.args)
    if getattr(config.option, "dist", "no") == "load" and not given:
        config.option.dist = "loadscope"


@pytest.fixture(scope="session")
def launcher_env(tmp_path_factory):
    """Environment for launcher subprocesses: one XLA thread each, and a compilation cache shared by the tests'
    launcher runs (the same model compiled once instead of once per process; JAX_COMPILATION_CACHE_DIR, if set,
    names a cache kept between sessions)."""
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(tmp_path_factory.mktemp("jax_cache"))
    return {**os.environ, "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false", "JAX_COMPILATION_CACHE_DIR": cache}


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drops JAX's compiled programs after each test module. One pytest process compiles thousands of programs;
    XLA's CPU JIT maps memory for each, and a process past vm.max_map_count (65,530 here) segfaults inside the
    next compile."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
