"""The test runner's own settings (tests/conftest.py): how many processes ``-n auto`` starts, and that ``-n``
keeps each module on one process."""

import conftest
import pytest


@pytest.mark.parametrize("devices, jax_platforms, cores, expected", [
    ([], None, 2, 2),                      # the CI machine: both cores
    ([], None, 64, 4),                     # a big CPU host: capped (each process holds a JAX runtime)
    (["/dev/nvidia0"], None, 16, 0),       # a GPU host: one process, or they compete for the GPU
    (["/dev/accel0"], "tpu", 96, 0),       # a TPU host
    (["/dev/nvidia0"], "cpu", 16, 4),      # JAX told to stay on the CPU: the GPU is not in the way
])
def test_auto_workers(monkeypatch, devices, jax_platforms, cores, expected):
    """Catches the accelerator check dropped (a GPU host starting 16 processes that each take the GPU) or the cap
    ignored."""
    monkeypatch.setattr(conftest.glob, "glob", lambda pattern: [d for d in devices if d.startswith(pattern[:9])])
    monkeypatch.setattr(conftest.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    if jax_platforms is None:
        monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    else:
        monkeypatch.setenv("JAX_PLATFORMS", jax_platforms)
    assert conftest.pytest_xdist_auto_num_workers(None) == expected


class _Config:
    def __init__(self, dist, args):
        self.option = type("Option", (), {"dist": dist})()
        self.invocation_params = type("Params", (), {"args": tuple(args)})()


@pytest.mark.parametrize("dist, args, expected", [
    ("load", ["-n", "auto"], "loadscope"),            # -n alone: modules kept whole
    ("load", ["-n", "2", "--dist", "load"], "load"),  # asked for: kept
    ("load", ["--dist=load", "-n", "2"], "load"),
    ("no", [], "no"),                                 # no -n: one process, nothing to change
])
def test_dist_defaults_to_loadscope(dist, args, expected):
    """Catches every module's fixtures built again on each process (``load``), or an explicit --dist overridden."""
    config = _Config(dist, args)
    conftest.pytest_configure(config)
    assert config.option.dist == expected
