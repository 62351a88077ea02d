"""Shared test helpers: fresh random inputs per case and relative-error comparisons."""

import os
import time
import zlib
from pathlib import Path

import jax
import numpy as np
import pytest


def case_key(*parts):
    """A PRNG key that differs for every parametrised case (so each case draws fresh inputs)."""
    return jax.random.PRNGKey(zlib.crc32(repr(parts).encode()))


def rel_err(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def assert_trees_close(actual, expected, tol, what=""):
    leaves_a, tree_a = jax.tree_util.tree_flatten(actual)
    leaves_e, tree_e = jax.tree_util.tree_flatten(expected)
    assert tree_a == tree_e, f"{what}: tree structures differ: {tree_a} vs {tree_e}"
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(expected)[0]]
    for path, a, e in zip(paths, leaves_a, leaves_e):
        assert np.all(np.isfinite(np.asarray(a))), f"{what}{path}: non-finite values"
        err = rel_err(a, e)
        assert err <= tol, f"{what}{path}: relative error {err:.3g} > {tol:.3g}"


def finished_checkpoints(workdir) -> list[int]:
    """Steps of the checkpoints orbax has finished in ``workdir``: it saves asynchronously into a temporary folder
    and renames it to the step number only once every process has written its part."""
    folder = Path(workdir) / "checkpoints"
    return [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.exists() else []


TIMING_FIELDS = ("steps_per_s", "tokens_per_s", "elapsed_s")


def without_timing(rows: list[dict]) -> list[dict]:
    """metrics.jsonl rows without the wall-clock fields: what two runs of the same training must agree on, bitwise."""
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


def checkpoint_params(workdir, step=None) -> list:
    """The parameter leaves (NumPy) of a run's checkpoint (latest by default)."""
    from sleepjax.train import load_run

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(load_run(workdir, step)[0])]


def assert_bitwise_equal(a: list, b: list, what=""):
    assert len(a) == len(b), what
    for i, (x, y) in enumerate(zip(a, b)):
        np.testing.assert_array_equal(x, y, err_msg=f"{what} leaf {i}")


def damage_checkpoint(workdir, step: int, how: str = "data") -> None:
    """Damages checkpoint ``step`` as storage does: ``data`` overwrites every data file with garbage of the same
    size; ``metadata`` deletes the tree metadata orbax reads first."""
    folder = Path(workdir) / "checkpoints" / str(step)
    assert folder.is_dir(), f"no checkpoint {step} in {workdir}"
    if how == "data":
        files = [p for p in folder.rglob("*") if p.is_file() and p.parent.name == "d"]
        assert files, f"no data files under {folder}"
        rng = np.random.default_rng(step)
        for p in files:
            p.write_bytes(rng.integers(0, 256, p.stat().st_size, dtype=np.uint8).tobytes())
    elif how == "metadata":
        (folder / "default" / "_METADATA").unlink()
    else:
        raise ValueError(f"how must be 'data' or 'metadata', got {how!r}")


@pytest.fixture(scope="session")
def launcher_env(tmp_path_factory):
    """Environment for launcher subprocesses: one XLA thread each, and a compilation cache shared by the tests'
    launcher runs (the same model compiled once instead of once per process; JAX_COMPILATION_CACHE_DIR, if set,
    names a cache kept between sessions)."""
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(tmp_path_factory.mktemp("jax_cache"))
    return {**os.environ, "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false", "JAX_COMPILATION_CACHE_DIR": cache}


def wait_for_step(procs, workdir, step, past_a_checkpoint=False, timeout=300):
    """Until the children's log reaches ``step`` (read defensively: a child may be mid-append), and with
    ``past_a_checkpoint`` until training has moved past a finished checkpoint; fails if a child ends first."""
    from sleepjax.metrics_log import read_metrics

    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = read_metrics(Path(workdir) / "metrics.jsonl")
        last = rows[-1]["step"] if rows else 0
        if last >= step and (not past_a_checkpoint or last > max(finished_checkpoints(workdir), default=1e9)):
            return
        ended = [p for p in procs if p.poll() is not None]
        assert not ended, "the run ended before it could be interrupted\n" + str(ended[0].communicate()[0])[-3000:]
        time.sleep(0.02)
    raise AssertionError(f"the run did not reach step {step} in {timeout} s")
