"""Looped models (Ouro: ``loop_steps``, ``sandwich_norm_layers``) against the float64 NumPy reference
(tests/helpers/numpy_reference.py, which runs the layer list loop_steps times with its own per-run carries).

Covered: Algorithm 1 with sleeping, waking and a short last window at N = 2 (sleep passes over the whole looped
stack, the final norm between them), ``sleep_layers`` inside the looped stack, sliding eviction, the stream (per
loop KV caches and fast weights), consolidate, and MLP-free JetBlocks among sandwich-normed layers (the paper's
Ouro recipe). Tolerance as in test_model_reference.py: max |jax - ref| / max |ref| <= 1e-4.
"""

import jax
import pytest

import sleepjax
from helpers import numpy_reference as ref
from helpers.compare import assert_close, assert_states_close, case_key
from helpers.models import TINY, make_params, mixed_mask, random_state, run_stream

# Three loops of attn-jet (the jet layer MLP-free, the attention layer sandwich-normed): every looping field off
# its default (test_config_fields.py's table points here).
LOOP = dict(layers=("attn", "jet"), loop_steps=3, sandwich_norm_layers=(0,), mlp_free_layers=(1,), jet_heads=2,
            jet_key_dim=8, jet_value_dim=8)


def test_loop_state_and_carries_per_loop():
    """Each loop of a layer has its own fast weights (a model that shared one state across loops would have 1)."""
    params = make_params("loop-shapes", **LOOP)
    assert len(params.layers) == 2  # weights are shared: one set per layer, not per loop
    assert [tuple(s.shape) for s in sleepjax.init_state(params, 2)] == [(2, 2, 8, 8)] * 3
    assert params.config.stack == ("attn", "jet") * 3


@pytest.mark.parametrize("sleep_n,sleep_layers", [(2, None), pytest.param(2, (1, 5), marks=pytest.mark.slow)])
def test_loop_forward_matches_reference(sleep_n, sleep_layers):
    params = make_params(("loop-fwd", sleep_layers), sleep_n=sleep_n, sleep_layers=sleep_layers, **LOOP)
    B, T = 3, 23
    tokens = jax.random.randint(case_key("loop-fwd-tokens"), (B, T), 0, 13)
    mask = mixed_mask(B, T)
    state = random_state(params, B, case_key("loop-fwd-state"))
    logits, final = jax.jit(lambda p, t, m, s: sleepjax.forward(p, t, m, s, return_state=True))(
        params, tokens, mask, state)
    w = ref.Weights(params)
    ref_logits, ref_final = ref.algorithm1(w, tokens, mask, ref.states_from_jax(state))
    assert_close(logits, ref_logits, "logits")
    assert_states_close(final, ref_final, "final state")
    value, _ = sleepjax.loss(params, tokens, mask, )
    ref_zero_logits, _ = ref.algorithm1(w, tokens, mask)
    expected = ref.masked_loss(ref_zero_logits, tokens, mask)
    assert abs(float(value) - expected) <= 1e-4 * max(abs(expected), 1.0)


def test_loop_consolidate_matches_reference():
    params = make_params("loop-cons", sleep_n=3, **LOOP)
    ctx = jax.random.randint(case_key("loop-ctx"), (2, 5), 0, 13)
    state = random_state(params, 2, case_key("loop-cons-state"))
    out = jax.jit(sleepjax.consolidate)(params, state, ctx)
    expected = ref.consolidate(ref.Weights(params), ref.states_from_jax(state), ctx, 3)
    assert_states_close(out, expected, "consolidate")


@pytest.mark.parametrize("eviction", [pytest.param("hard", marks=pytest.mark.slow), "sliding"])
def test_loop_stream_matches_reference(eviction):
    """The one-token path keeps one KV cache and one fast-weight state per loop of each layer."""
    params = make_params(("loop-stream", eviction), sleep_n=2, eviction=eviction, **LOOP)
    B, T = 2, 15
    tokens = jax.random.randint(case_key("loop-stream-tokens", eviction), (B, T), 0, 13)
    logits, stream = run_stream(params, tokens)
    w = ref.Weights(params)
    ref_logits, ref_state, ref_sleeps = ref.stream(w, tokens)
    assert_close(logits, ref_logits, "stream logits")
    assert_states_close(stream.fast_weights, ref_state, "stream fast weights")
    assert int(stream.sleeps) == ref_sleeps == 2


def test_loop_config_validation():
    with pytest.raises(ValueError, match="loop_steps"):
        sleepjax.ModelConfig(**{**TINY, "loop_steps": 0})
    with pytest.raises(ValueError, match="sandwich_norm_layers"):
        sleepjax.ModelConfig(**{**TINY, "sandwich_norm_layers": (4,)})
    with pytest.raises(ValueError, match="sleep_layers"):  # indexes the looped stack: 4 layers x 2 loops = 8
        sleepjax.ModelConfig(**{**TINY, "loop_steps": 2, "sleep_layers": (0, 9)})
    assert sleepjax.ModelConfig(**{**TINY, "loop_steps": 2, "sleep_layers": (2, 8)}).sleep_layer_range == (2, 8)
