"""Fresh random inputs per case and comparisons (relative error, trees, bitwise)."""

import zlib

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


def assert_bitwise_equal(a: list, b: list, what=""):
    assert len(a) == len(b), what
    for i, (x, y) in enumerate(zip(a, b)):
        np.testing.assert_array_equal(x, y, err_msg=f"{what} leaf {i}")


REFERENCE_TOL = 1e-4  # max |jax - ref| / max |ref| against the float64 NumPy reference


def assert_close(actual, expected, what, tol=REFERENCE_TOL):
    """float32 ``actual`` against a float64 reference: finite, and relative error <= tol."""
    actual = np.asarray(actual, np.float64)
    assert np.all(np.isfinite(actual)), f"{what}: non-finite"
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


def assert_states_close(jax_state, ref_states, what, tol=REFERENCE_TOL):
    """sleepjax's fast weights (one per fast-weight layer) against the reference's per-layer states."""
    from helpers import numpy_reference as ref

    for i, (a, e) in enumerate(zip(jax_state, ref.states_to_layers(ref_states))):
        assert_close(a, e, f"{what}: fast weight {i}", tol)
