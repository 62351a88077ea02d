"""JetBlock ("jet") and sliding-window attention ("swa", with q/k/v biases) layers against the float64 NumPy
reference (tests/helpers/numpy_reference.py, written token by token from the Jet-Nemotron description).

Covered: Algorithm 1 (windows that sleep, wake and a short padded last window, N = 2; at N = 3 this 5-layer stack
amplifies float32 rounding to ~1e-4, while the N = 1 error is ~1e-6), the loss, ``consolidate`` from a given state, the stream (two slept windows and part of a third), ``sleep_layers`` and sliding eviction; a
block with strong decay (g down to about -8 per token), beta near 0 and 1 and a dynamic conv far from its static
part; odd lengths. Tolerance as in test_model_reference.py: max |jax - ref| / max |ref| <= 1e-4.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sleepjax
from helpers import numpy_reference as ref
from helpers.compare import assert_close, assert_states_close, case_key
from helpers.models import TINY, make_params, mixed_mask, random_state, run_stream

TOL = 1e-4
# Every jet field off its default (test_config_fields.py's table points here): jet layers with Dk != Dv, a swa
# layer whose window (3) is shorter than sleepjax's (6), q/k/v biases, a GDN layer beside them.
JET = dict(layers=("jet", "swa", "gdn", "jet", "attn"), jet_heads=3, jet_key_dim=8, jet_value_dim=4,
           jet_conv_size=3, jet_conv_reduction=2, jet_norm_eps=0.05, swa_window=3, attn_bias=True)


def test_jet_state_shapes():
    params = make_params("jet-shapes", **JET)
    shapes = [tuple(s.shape) for s in sleepjax.init_state(params, 2)]
    assert shapes == [(2, 3, 8, 4), (2, 4, 8, 4), (2, 3, 8, 4)]  # jet, gdn (TINY's 4 value heads), jet


def test_hard_jet_block():
    """One jet layer with strong decay, saturated beta and a large generated conv kernel, odd length 7."""
    params = make_params("jet-hard", layers=("jet",), jet_heads=2, jet_key_dim=8, jet_value_dim=4)
    p = dict(params.layers[0])
    p["w_b"] = 6.0 * p["w_b"]
    p["dt_bias"] = p["dt_bias"] + jnp.linspace(-2.0, 3.0, p["dt_bias"].shape[0])
    p["conv_w2"] = 4.0 * p["conv_w2"]
    params = params.replace(layers=(p,))
    tokens = jax.random.randint(case_key("jet-hard-tokens"), (2, 7), 0, 13)
    state = random_state(params, 2, case_key("jet-hard-state"))
    w = ref.Weights(params)
    x = ref.rms_norm(w.embed[np.asarray(tokens)], w.layers[0]["norm1"], 1e-6)
    beta = ref.sigmoid(x @ w.layers[0]["w_b"])
    g = -np.exp(w.layers[0]["a_log"]) * ref.softplus(x @ w.layers[0]["w_a"] + w.layers[0]["dt_bias"])
    assert beta.min() < 0.02 and beta.max() > 0.98 and g.min() < -5, "the case must reach the gate extremes"
    mask = jnp.ones((2, 7), bool)
    logits, new_state = sleepjax.forward(params.replace(config=params.config.replace(window=7)), tokens, mask, state,
                                         return_state=True)
    w = ref.Weights(params.replace(config=params.config.replace(window=7)))
    ref_logits, ref_new = ref.algorithm1(w, tokens, np.ones((2, 7), bool), ref.states_from_jax(state))
    assert_close(logits, ref_logits, "logits")
    assert_states_close(new_state, ref_new, "hard jet")


@pytest.mark.parametrize("sleep_n,given_state", [(2, True), (1, False)])
def test_jet_forward_and_loss_match_reference(sleep_n, given_state):
    params = make_params(("jet-fwd", sleep_n), sleep_n=sleep_n, **JET)
    B, T = 3, 23  # windows of 6, 6, 6, 5
    tokens = jax.random.randint(case_key("jet-fwd-tokens", sleep_n), (B, T), 0, 13)
    mask = mixed_mask(B, T)
    state = random_state(params, B, case_key("jet-fwd-state")) if given_state else None
    logits, final = jax.jit(lambda p, t, m, s: sleepjax.forward(p, t, m, s, return_state=True))(
        params, tokens, mask, state)
    w = ref.Weights(params)
    ref_logits, ref_final = ref.algorithm1(w, tokens, mask, ref.states_from_jax(state) if given_state else None)
    assert_close(logits, ref_logits, "logits")
    assert_states_close(final, ref_final, "final state")
    if not given_state:
        value, _ = sleepjax.loss(params, tokens, mask)
        expected = ref.masked_loss(ref_logits, tokens, mask)
        assert abs(float(value) - expected) <= TOL * max(abs(expected), 1.0)


def test_jet_consolidate_matches_reference():
    params = make_params("jet-cons", sleep_n=3, **JET)
    ctx = jax.random.randint(case_key("jet-ctx"), (2, 5), 0, 13)
    state = random_state(params, 2, case_key("jet-cons-state"))
    out = jax.jit(sleepjax.consolidate)(params, state, ctx)
    expected = ref.consolidate(ref.Weights(params), ref.states_from_jax(state), ctx, 3)
    assert_states_close(out, expected, "consolidate")


@pytest.mark.parametrize("eviction,sleep_layers", [("hard", None), ("sliding", (1, 4))])
def test_jet_stream_matches_reference(eviction, sleep_layers):
    """The one-token path (dynamic-conv cache of raw v projections, swa masks on the KV cache) against the
    reference's stream, over two slept windows and 3 tokens of a third; also Algorithm 1 under the same options."""
    params = make_params(("jet-stream", eviction, sleep_layers), sleep_n=2, eviction=eviction,
                         sleep_layers=sleep_layers, **JET)
    B, T = 2, 15
    tokens = jax.random.randint(case_key("jet-stream-tokens", eviction), (B, T), 0, 13)
    logits, stream = run_stream(params, tokens)
    w = ref.Weights(params)
    ref_logits, ref_state, ref_sleeps = ref.stream(w, tokens)
    assert_close(logits, ref_logits, "stream logits")
    assert_states_close(stream.fast_weights, ref_state, "stream fast weights")
    assert int(stream.sleeps) == ref_sleeps == 2
    mask = mixed_mask(B, T)
    fwd, final = sleepjax.forward(params, tokens, mask, return_state=True)
    ref_fwd, ref_final = ref.algorithm1(w, tokens, mask)
    assert_close(fwd, ref_fwd, "forward logits")
    assert_states_close(final, ref_final, "forward state")


def test_jet_config_validation():
    base = {**TINY, "layers": ("jet", "swa")}
    with pytest.raises(ValueError, match="swa_window"):
        sleepjax.ModelConfig(**base)
    with pytest.raises(ValueError, match="jet_conv_reduction"):
        sleepjax.ModelConfig(**{**base, "swa_window": 4, "jet_heads": 1, "jet_value_dim": 4, "jet_conv_reduction": 8})
    with pytest.raises(ValueError, match="jet_norm_eps"):
        sleepjax.ModelConfig(**{**base, "swa_window": 4, "jet_norm_eps": 0.0})
    with pytest.raises(ValueError, match="jet_conv_size"):
        sleepjax.ModelConfig(**{**base, "swa_window": 4, "jet_conv_size": 0})
