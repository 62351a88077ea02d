"""Streaming wake: equal to Algorithm 1's forward; sleeps by itself when the window fills."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sleepjax
from helpers.compare import assert_trees_close, case_key, rel_err
from helpers.models import random_tokens, run_stream, small_model

SLOW = pytest.mark.slow  # cases the default run skips (python -m pytest -m slow runs them)


@pytest.mark.parametrize("sleep_n,T", [(3, 21), pytest.param(2, 16, marks=SLOW), pytest.param(4, 5, marks=SLOW)])
def test_stream_matches_forward_on_current_window(sleep_n, T):
    params = small_model(sleep_n=sleep_n)
    tokens = random_tokens(case_key("stream", sleep_n, T), 2, T)
    logits, stream = run_stream(params, tokens)
    L = params.config.window
    start = (T - 1) // L * L if T % L else T - L  # the current window (full windows have already slept)
    if T % L == 0:
        start = T  # the stream just slept: no current window; compare the state instead
    mask = np.zeros((2, T), bool)
    mask[:, start:] = True
    ref, ref_state = sleepjax.forward(params, tokens, mask, return_state=True)
    if start < T:
        assert rel_err(logits[:, start:], ref[:, start:]) < 1e-5
    else:
        full_sleep_mask = np.zeros((2, T), bool)
        _, slept = sleepjax.forward(params, tokens, full_sleep_mask, return_state=True)
        assert_trees_close(stream.fast_weights, slept, 1e-5, "state after sleep")
    assert int(stream.sleeps) == T // L


def test_stream_n1_equals_forward_everywhere():
    params = small_model(sleep_n=1)
    tokens = random_tokens(case_key("n1"), 3, 27)
    logits, stream = run_stream(params, tokens)
    ref, ref_state = sleepjax.forward(params, tokens, jnp.ones((3, 27), bool), return_state=True)
    assert rel_err(logits, ref) < 1e-5
    assert_trees_close(stream.fast_weights, ref_state, 1e-5, "state")


@pytest.mark.slow
def test_stream_sleep_changes_state_for_n_greater_than_1():
    """At the window boundary the stream's state is the N-pass consolidation, not the wake state."""
    params = small_model(sleep_n=3)
    tokens = random_tokens(case_key("boundary"), 1, 8)
    _, stream = run_stream(params, tokens)
    expected = sleepjax.consolidate(params, sleepjax.init_state(params, 1), tokens)
    assert_trees_close(stream.fast_weights, expected, 1e-5, "slept")
    assert int(stream.position) == 0 and int(stream.sleeps) == 1
    _, wake_state = sleepjax.forward(params, tokens, jnp.ones((1, 8), bool), return_state=True)
    assert rel_err(stream.fast_weights[0], wake_state[0]) > 1e-2


def test_stream_bad_token():
    params = small_model()
    stream = sleepjax.stream_init(params, 2)
    with pytest.raises(ValueError, match="token must have shape"):
        sleepjax.stream_step(params, stream, jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="token must be an integer array"):
        sleepjax.stream_step(params, stream, jnp.zeros((2,), jnp.float32))


def _example(stream, b):
    """Sequence b of a per-example stream as a batch-wide stream of batch 1."""
    scalars = {k: getattr(stream, k)[b] for k in ("position", "sleeps", "has_context")}
    rows = jax.tree_util.tree_map(lambda x: x[b:b + 1], stream.replace(position=None, sleeps=None, has_context=None))
    return rows.replace(**scalars)


def _assert_same_stream(actual, expected, what, tol=1e-5):
    assert int(actual.position) == int(expected.position), what
    assert int(actual.sleeps) == int(expected.sleeps), what
    assert bool(actual.has_context) == bool(expected.has_context), what
    p = int(expected.position)
    np.testing.assert_array_equal(actual.window_tokens[:, :p], expected.window_tokens[:, :p], err_msg=what)
    for name in ("fast_weights", "window_start", "kv_cache", "context_kv", "conv_cache"):
        leaves = (jax.tree_util.tree_leaves(getattr(s, name)) for s in (actual, expected))
        for a, e in zip(*leaves):
            scale = max(float(jnp.max(jnp.abs(e))), 1e-6)
            assert float(jnp.max(jnp.abs(a - e))) <= tol * scale, f"{what}: {name}"


@pytest.mark.parametrize("overrides", [
    {},
    pytest.param(dict(eviction="sliding", sleep_layers=(1, 3)), marks=SLOW),
    pytest.param(dict(layers=("jet", "swa"), loop_steps=2, swa_window=5, jet_heads=2, jet_key_dim=8, jet_value_dim=4,
                      eviction="sliding"), marks=SLOW),
])
def test_prefill_equals_the_token_by_token_stream(overrides):
    # Catches: a prefill cache (keys after/before RoPE, the conv taps before the window's slot, the partial
    # window's fast weights, the sliding context of the window a sequence is in) that is not what stream_step leaves.
    params = small_model(sleep_n=2, **overrides)
    lengths = [0, 5, 8, 13, 17]  # empty, within, exactly one window, one and a bit, two and a bit
    tokens = random_tokens(case_key("prefill", tuple(sorted(overrides))), len(lengths), 20)
    stream = jax.jit(sleepjax.stream_prefill)(params, tokens, jnp.asarray(lengths))
    assert stream.per_example and stream.position.tolist() == [n % 8 for n in lengths]
    for b, n in enumerate(lengths):
        expected = run_stream(params, tokens[b:b + 1, :n])[1] if n else sleepjax.stream_init(params, 1)
        _assert_same_stream(_example(stream, b), expected, f"sequence {b} ({n} tokens)")


def test_per_example_step_moves_only_the_active_sequences():
    # Catches: an inactive sequence whose caches, position or fast weights still change, a sleep of every sequence
    # when only one window fills, a per-example step that differs from the batch-wide one of each sequence.
    params = small_model(sleep_n=2)
    lengths = jnp.asarray([7, 3, 7])
    tokens = random_tokens(case_key("active"), 3, 8)
    stream = jax.jit(sleepjax.stream_prefill)(params, tokens, lengths)
    active = jnp.asarray([True, True, False])
    logits, stepped = jax.jit(sleepjax.stream_step)(params, stream, tokens[:, 7], active=active)
    assert stepped.position.tolist() == [0, 4, 7] and stepped.sleeps.tolist() == [1, 0, 0]
    # sequence 2 (inactive) is untouched, but for its stale slot 7 of the window and the caches
    stale = lambda x: x.at[:, 7].set(0) if x.ndim >= 2 and x.shape[1] == 8 else x
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(stale(a[2:]), stale(b[2:])), stepped, stream)
    for b in (0, 1):
        expected_logits, expected = run_stream(params, jnp.concatenate(
            [tokens[b:b + 1, :int(lengths[b])], tokens[b:b + 1, 7:8]], axis=1))
        assert rel_err(logits[b], expected_logits[0, -1]) < 1e-5
        _assert_same_stream(_example(stepped, b), expected, f"sequence {b}")
    with pytest.raises(ValueError, match="per-example stream"):
        sleepjax.stream_step(params, sleepjax.stream_init(params, 3), tokens[:, 0], active=active)
