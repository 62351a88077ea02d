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
