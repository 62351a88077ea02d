"""Shared test helpers: fresh random inputs per case and relative-error comparisons."""

import zlib
from pathlib import Path

import jax
import numpy as np


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
