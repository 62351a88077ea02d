"""sleepjax (float32) against the independent float64 NumPy reference (tests/helpers/numpy_reference.py).

Covered: one block of each kind (1-layer models through the public API), the whole stack under Algorithm 1
(several windows, sleep with N passes on unsupervised windows, wake on supervised ones, a short padded last
window, fast weights carried, a given initial state), ``consolidate`` and ``stream_step``; both fast-weight rules;
grouped heads in attention (4 query heads on 2 key/value heads) and in GDN (4 value heads on 2 key heads); every
weight perturbed away from its initial value (norm weights are not all ones), Dk != Dv.

Tolerance: max |jax - ref| / max |ref| <= 1e-4 on logits and fast weights. Measured float32 error at these
sizes is ~1e-6; every mistake this file is meant to catch (a missing gate factor, a transposed head layout, a
wrong window or pass count) moves the result by 1e-2 or more.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sleepjax
from helpers import numpy_reference as ref
from helpers.compare import assert_close, assert_states_close, case_key, rel_err
from helpers.models import make_params, random_state, run_stream



# ---------------------------------------------------------------------------------------------------------------
# One block of each kind


@pytest.mark.parametrize("kind,rule", [("attn", "delta"), ("gdn", "delta"), ("gdn", "hebbian")])
def test_single_block_model_matches_reference(kind, rule):
    """Embed -> one block -> RMSNorm -> OutProj over one full window (wake), from a non-zero state."""
    params = make_params(("block", kind, rule), layers=(kind,), ssm_rule=rule)
    tokens = jax.random.randint(case_key("block-tokens", kind), (2, 6), 0, 13)
    state = random_state(params, 2, case_key("block-state", kind)) if kind == "gdn" else ()
    logits, new_state = sleepjax.forward(params, tokens, jnp.ones((2, 6), bool), state, return_state=True)
    w = ref.Weights(params)
    ref_states = ref.states_from_jax(state) if kind == "gdn" else [[], []]
    ref_logits, ref_new = ref.algorithm1(w, tokens, np.ones((2, 6), bool), ref_states)
    assert_close(logits, ref_logits, f"{kind} logits")
    if kind == "gdn":
        assert_states_close(new_state, ref_new, kind)


def test_hard_gates_block():
    """A GDN block with strong decay (g down to about -8 per token) and beta saturated near 0 and 1."""
    params = make_params("hard", layers=("gdn",))
    p = dict(params.layers[0])
    p["w_b"] = 6.0 * p["w_b"]
    p["dt_bias"] = p["dt_bias"] + jnp.linspace(-2.0, 3.0, p["dt_bias"].shape[0])
    params = params.replace(layers=(p,))
    tokens = jax.random.randint(case_key("hard-tokens"), (2, 6), 0, 13)
    state = random_state(params, 2, case_key("hard-state"))
    w = ref.Weights(params)
    xs = w.embed[np.asarray(tokens)]
    x = ref.rms_norm(xs, w.layers[0]["norm1"], 1e-6)
    beta = ref.sigmoid(x @ w.layers[0]["w_b"])
    assert beta.min() < 0.02 and beta.max() > 0.98, "the case must reach the gate extremes"
    logits, new_state = sleepjax.forward(params, tokens, jnp.ones((2, 6), bool), state, return_state=True)
    ref_logits, ref_new = ref.algorithm1(w, tokens, np.ones((2, 6), bool), ref.states_from_jax(state))
    assert_close(logits, ref_logits, "logits")
    assert_states_close(new_state, ref_new, "hard gates")


# ---------------------------------------------------------------------------------------------------------------
# Algorithm 1 over the whole stack


def masks(pattern, B, T):
    """Supervision patterns (window = 6). 'mixed': window 0 sleeps, window 1 is supervised in the LAST example
    only (it wakes there, the others sleep), window 2 sleeps, the short last window wakes in the first example
    only (the others sleep over it).
    'sleep_last': windows 0 and 2 sleep, 1 wakes (every example), and the short last window sleeps (padding)."""
    m = np.zeros((B, T), bool)
    if pattern == "mixed":
        m[B - 1, 7:9] = True
        m[0, T - 2] = True
    else:
        m[:, 6:12] = True
    return m


@pytest.mark.parametrize("sleep_n,rule,pattern,given_state", [
    (3, "delta", "mixed", False),
    (3, "hebbian", "sleep_last", True),
    (1, "delta", "sleep_last", False),
])
def test_forward_matches_reference(sleep_n, rule, pattern, given_state):
    params = make_params(("fwd", sleep_n, rule), sleep_n=sleep_n, ssm_rule=rule)
    B, T = 3, 22  # windows of 6, 6, 6, 4
    tokens = jax.random.randint(case_key("fwd-tokens", sleep_n, rule), (B, T), 0, 13)
    mask = masks(pattern, B, T)
    state = random_state(params, B, case_key("fwd-state")) if given_state else None
    logits, final = jax.jit(lambda p, t, m, s: sleepjax.forward(p, t, m, s, return_state=True))(
        params, tokens, mask, state)
    w = ref.Weights(params)
    ref_logits, ref_final = ref.algorithm1(w, tokens, mask, ref.states_from_jax(state) if given_state else None)
    assert logits.shape == (B, T, 13)
    assert_close(logits, ref_logits, "logits")
    assert_states_close(final, ref_final, "final state")


@pytest.mark.parametrize("sleep_n,rule,T", [(3, "delta", 6), (1, "hebbian", 4)])
def test_consolidate_matches_reference(sleep_n, rule, T):
    params = make_params(("cons", sleep_n, rule), sleep_n=sleep_n, ssm_rule=rule)
    ctx = jax.random.randint(case_key("ctx", sleep_n, rule, T), (2, T), 0, 13)
    state = random_state(params, 2, case_key("cons-state", sleep_n))
    out = jax.jit(sleepjax.consolidate)(params, state, ctx)
    expected = ref.consolidate(ref.Weights(params), ref.states_from_jax(state), ctx, sleep_n)
    assert_states_close(out, expected, f"consolidate N={sleep_n}")


@pytest.mark.parametrize("sleep_n", [1, 3])
def test_stream_matches_reference(sleep_n):
    params = make_params(("stream", sleep_n), sleep_n=sleep_n)
    B, T = 2, 15  # two full windows (each slept) and 3 tokens of the third
    tokens = jax.random.randint(case_key("stream-tokens", sleep_n), (B, T), 0, 13)
    logits, stream = run_stream(params, tokens)
    ref_logits, ref_state, ref_sleeps = ref.stream(ref.Weights(params), tokens)
    assert_close(logits, ref_logits, "stream logits")
    assert_states_close(stream.fast_weights, ref_state, "stream fast weights")
    assert int(stream.sleeps) == ref_sleeps == 2


# ---------------------------------------------------------------------------------------------------------------
# Options beyond the defaults (sleep_layers, sliding eviction, the pretrained-checkpoint options)

OPTIONS = dict(sleep_layers=(1, 3), attn_output_gate=True, qk_norm=True, rope_dim=4, norm_weight_offset=1.0,
               mlp_free_layers=(1,), tie_embeddings=True)


def test_pretrained_options_and_sleep_layers_match_reference():
    """Every option at once: layers 1-2 loop during sleep (layer 0 runs once before, layer 3 once after), gated
    attention output, q/k norm, half the head dims rotated, zero-centred norms, an MLP-free GDN layer, tied
    embeddings."""
    params = make_params("options", sleep_n=3, **OPTIONS)
    B, T = 3, 22
    tokens = jax.random.randint(case_key("options-tokens"), (B, T), 0, 13)
    mask = masks("mixed", B, T)
    logits, final = jax.jit(lambda p, t, m: sleepjax.forward(p, t, m, return_state=True))(params, tokens, mask)
    ref_logits, ref_final = ref.algorithm1(ref.Weights(params), tokens, mask)
    assert_close(logits, ref_logits, "logits")
    assert_states_close(final, ref_final, "final state")


@pytest.mark.parametrize("sleep_layers", [None, (0, 2)])
def test_sliding_eviction_matches_reference(sleep_layers):
    """Sliding eviction: every window's attention also sees the previous window's wake-pass keys/values. With
    sleep_layers=(0, 2) an attention layer follows the sleep layers, so its kept keys/values come from a run on
    the first pass's output. Forward (Algorithm 1, N = 2) and the stream against the reference."""
    params = make_params(("sliding", sleep_layers), sleep_n=2, eviction="sliding", sleep_layers=sleep_layers)
    B, T = 3, 22
    tokens = jax.random.randint(case_key("sliding-tokens", sleep_layers), (B, T), 0, 13)
    mask = masks("mixed", B, T)
    w = ref.Weights(params)
    logits, final = jax.jit(lambda p, t, m: sleepjax.forward(p, t, m, return_state=True))(params, tokens, mask)
    ref_logits, ref_final = ref.algorithm1(w, tokens, mask)
    assert_close(logits, ref_logits, "forward logits")
    assert_states_close(final, ref_final, "forward state")
    if sleep_layers is None:
        return
    step = jax.jit(sleepjax.stream_step)
    stream = sleepjax.stream_init(params, B)
    out = []
    for t in range(15):
        o, stream = step(params, stream, tokens[:, t])
        out.append(o)
    ref_logits, ref_state, _ = ref.stream(w, tokens[:, :15])
    assert_close(jnp.stack(out, 1), ref_logits, "stream logits")
    assert_states_close(stream.fast_weights, ref_state, "stream state")
