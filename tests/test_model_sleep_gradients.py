"""Gradients through sleep: jax.grad of the supervised loss against central finite differences of the float64
NumPy reference (tests/helpers/numpy_reference.py), through consolidation windows and the fast weights they carry.

The finite differences are taken on the float64 reference (step 1e-4: truncation ~1e-8, round-off ~1e-12), so
they are the true derivative of Algorithm 1 whatever sleepjax does; jax.grad runs in float32 (relative error
~1e-5). No jax_enable_x64 is needed, so nothing leaks into other tests. Both tests share one compiled
value_and_grad (one attn + one GDN layer, N = 3, delta rule; ~15 s of XLA compile on one core); the Hebbian
rule's gradients are checked at kernel level in test_kernels_gdn.py.
Cutting the gradient anywhere on the path window -> sleep passes -> S -> later window (a stop_gradient on the
fast weights between windows or between passes) zeroes the second test's embedding gradient and moves the
first test's directional derivative by far more than its tolerance.
"""

import jax
import jax.numpy as jnp
import numpy as np

import sleepjax
from helpers import numpy_reference as ref
from helpers.compare import case_key
from helpers.models import make_params

EPS = 1e-4
TOL = 2e-3  # |d_jax - d_fd| / |d_fd|


CONFIG = dict(layers=("attn", "gdn"), sleep_n=3)
loss_and_grad = jax.jit(jax.value_and_grad(lambda p, tokens, mask: sleepjax.loss(p, tokens, mask)[0]))


def fd_directional(params, direction, tokens, mask):
    """Central difference of the float64 reference loss along ``direction`` (a pytree like params)."""
    def at(t):
        moved = jax.tree_util.tree_map(lambda p, d: np.asarray(p, np.float64) + t * np.asarray(d, np.float64),
                                       params, direction)
        logits, _ = ref.algorithm1(ref.Weights(moved), tokens, mask)
        return ref.masked_loss(logits, tokens, mask)
    return (at(EPS) - at(-EPS)) / (2 * EPS)


def jax_directional(grads, direction):
    return sum(float(np.sum(np.asarray(g, np.float64) * np.asarray(d, np.float64)))
               for g, d in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(direction)))


def sleep_then_wake(B=2, T=16, vocab=13):
    """Windows of 6: windows 0 and 1 are consolidated (no supervision), the short last window (4 tokens) is
    supervised. Token vocab-1 appears ONLY in window 0 and is never a target."""
    tokens = np.array(jax.random.randint(case_key("grad-tokens", B, T), (B, T), 0, vocab - 1))
    tokens[:, [1, 4]] = vocab - 1
    mask = np.zeros((B, T), bool)
    mask[:, 12:15] = True
    return jnp.asarray(tokens, jnp.int32), mask


def test_grad_matches_finite_differences_through_sleep():
    params = make_params("grad", **CONFIG)
    tokens, mask = sleep_then_wake()
    value, grads = loss_and_grad(params, tokens, mask)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(case_key("direction"), len(leaves))
    direction = jax.tree_util.tree_unflatten(
        treedef, [jax.random.normal(k, x.shape) * (float(jnp.std(x)) or 1.0) for k, x in zip(keys, leaves)])
    logits, _ = ref.algorithm1(ref.Weights(params), tokens, mask)
    assert abs(float(value) - ref.masked_loss(logits, tokens, mask)) < 1e-4 * abs(float(value))
    expected = fd_directional(params, direction, tokens, mask)
    actual = jax_directional(grads, direction)
    assert abs(actual - expected) <= TOL * abs(expected), (actual, expected)


def test_token_seen_only_during_sleep_gets_gradient():
    """Token 12 occurs only in a consolidation window and is never predicted: it reaches the supervised loss only
    through the fast weights written during sleep (3 passes) and carried across two window boundaries."""
    params = make_params("sleep-token", **CONFIG)
    tokens, mask = sleep_then_wake()
    _, grads = loss_and_grad(params, tokens, mask)
    row = np.asarray(grads.embed[12], np.float64)
    assert np.abs(row).max() > 1e-6, "no gradient reaches a token seen only during sleep"
    direction = jax.tree_util.tree_map(jnp.zeros_like, params)
    unit = np.asarray(jax.random.normal(case_key("row-direction"), (params.config.d_model,)))
    direction = direction.replace(embed=direction.embed.at[12].set(unit))
    expected = fd_directional(params, direction, tokens, mask)
    assert abs(expected) > 1e-6, "the case must make the loss depend on the slept token"
    actual = float(row @ unit)
    assert abs(actual - expected) <= TOL * abs(expected), (actual, expected)
