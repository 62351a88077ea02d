"""Block pieces of sleepjax/layers.py that have their own fast paths: ``dense`` (one 2-D matmul over flattened
leading dims) and ``softmax_cross_entropy`` (custom fused gradient), against plain float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64

from helpers.compare import case_key, rel_err
from sleepjax import layers

SLOW = pytest.mark.slow  # cases the default run skips (python -m pytest -m slow runs them)


@pytest.mark.parametrize("shape", [(5,), (3, 5), (2, 7, 5), pytest.param((2, 3, 4, 5), marks=SLOW)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dense_is_a_matmul_over_the_last_axis(shape, dtype):
    kx, kw, kc = jax.random.split(case_key("dense", shape, dtype), 3)
    x = jax.random.normal(kx, shape).astype(dtype)
    w = jax.random.normal(kw, (5, 6))
    y = layers.dense(x, w)
    assert y.shape == shape[:-1] + (6,) and y.dtype == x.dtype
    ref = np.asarray(x, np.float64) @ np.asarray(w.astype(dtype), np.float64)
    assert rel_err(y, ref) < (1e-6 if dtype == "float32" else 1e-2)
    cot = jax.random.normal(kc, y.shape)
    gx, gw = jax.grad(lambda x, w: jnp.sum(layers.dense(x, w).astype(jnp.float32) * cot), (0, 1))(
        x.astype(jnp.float32), w)
    assert rel_err(gx, np.asarray(cot, np.float64) @ np.asarray(w, np.float64).T) < 1e-6
    xs, cs = np.asarray(x, np.float64).reshape(-1, 5), np.asarray(cot, np.float64).reshape(-1, 6)
    assert rel_err(gw, xs.T @ cs) < (1e-6 if dtype == "float32" else 1e-2)


@pytest.mark.parametrize("shape,vocab,spread", [((13,), 7, 1.0), ((2, 9), 50, 30.0),
                                                pytest.param((2, 3, 4), 1, 1.0, marks=SLOW)])
def test_softmax_cross_entropy_matches_log_softmax(shape, vocab, spread):
    """Values and gradients against float64 autodiff of -log_softmax[target]; large logits (spread 30) included,
    and ids 0 and V-1."""
    kl, kt, kc = jax.random.split(case_key("ce", shape, vocab), 3)
    logits = spread * jax.random.normal(kl, shape + (vocab,))
    targets = jax.random.randint(kt, shape, 0, vocab).reshape(-1).at[0].set(0).at[-1].set(vocab - 1).reshape(shape)
    cot = jax.random.normal(kc, shape)
    ce, grad = jax.jit(jax.value_and_grad(lambda l: jnp.sum(layers.softmax_cross_entropy(l, targets) * cot)))(logits)
    with enable_x64():
        def ref(l):
            lp = jax.nn.log_softmax(l, axis=-1)
            return -jnp.take_along_axis(lp, jnp.asarray(targets)[..., None], axis=-1)[..., 0]
        l64 = jnp.asarray(np.asarray(logits), jnp.float64)
        want_ce = np.asarray(ref(l64))
        want_grad = np.asarray(jax.grad(lambda l: jnp.sum(ref(l) * jnp.asarray(np.asarray(cot), jnp.float64)))(l64))
    assert rel_err(layers.softmax_cross_entropy(logits, targets), want_ce) < 1e-5
    assert rel_err(grad, want_grad) < 1e-5
    assert float(ce) == pytest.approx(float(np.sum(want_ce * np.asarray(cot))), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dense_many_is_separate_denses(dtype):
    """One fused matmul, split: the same outputs (to rounding) and gradients as one ``dense`` per weight."""
    ks = jax.random.split(case_key("dense_many", dtype), 5)
    x = jax.random.normal(ks[0], (2, 9, 8)).astype(dtype)
    ws = [jax.random.normal(k, (8, n)) for k, n in zip(ks[1:4], (5, 3, 1))]
    cot = [jax.random.normal(ks[4], (2, 9, w.shape[1])) for w in ws]
    fused, separate = layers.dense_many(x, ws), [layers.dense(x, w) for w in ws]
    tol = 1e-6 if dtype == "float32" else 1e-2
    for a, b in zip(fused, separate):
        assert a.shape == b.shape and a.dtype == b.dtype and rel_err(a, b) < tol

    def loss(fn):
        return lambda x, ws: sum(jnp.sum(y.astype(jnp.float32) * c) for y, c in zip(fn(x, ws), cot))

    g_fused = jax.grad(loss(layers.dense_many), (0, 1))(x.astype(jnp.float32), ws)
    g_sep = jax.grad(loss(lambda x, ws: [layers.dense(x, w) for w in ws]), (0, 1))(x.astype(jnp.float32), ws)
    for a, b in zip(jax.tree_util.tree_leaves(g_fused), jax.tree_util.tree_leaves(g_sep)):
        assert rel_err(a, b) < 1e-6
