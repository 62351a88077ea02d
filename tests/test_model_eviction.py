"""Sliding-window eviction and sleep_layers: training forward == streaming, an independent sliding-attention
reference, the kept keys/values are the wake pass's, and sleep_layers loops only its layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sleepjax
from helpers.compare import assert_trees_close, case_key, rel_err
from helpers.models import SMALL, random_tokens, run_stream
from sleepjax import layers
from sleepjax import model as model_lib
from sleepjax.kernels import attention as attention_kernels

SLOW = pytest.mark.slow  # cases the default run skips (python -m pytest -m slow runs them)


def model(sleep_n=1, **overrides):
    cfg = sleepjax.ModelConfig(**{**SMALL, "sleep_n": sleep_n, **overrides})
    return sleepjax.init(cfg, case_key("evict", sleep_n, tuple(sorted(overrides.items()))))


def sliding_attention_reference(params, tokens):
    """An attention-only model with sliding eviction and N = 1 is a plain sliding-window transformer: every token
    sees the L tokens up to itself. Written over the whole sequence at absolute positions, with the kernel's
    sliding_window mask (tested against jax.nn.dot_product_attention in the kernel suite), no windows at all."""
    cfg = params.config
    L, T = cfg.window, tokens.shape[1]
    h = model_lib.embed(params, tokens)
    for p in params.layers:
        x = layers.norm(h, p["norm1"], cfg)
        q, k, v = layers.attention_qkv(p, x, jnp.arange(T), cfg)
        o = attention_kernels.xla_window_attention(q, k, v, sliding_window=L)
        h = h + layers.attention_output(p, o, x, cfg)
        h = h + layers.mlp(p["mlp"], layers.norm(h, p["norm2"], cfg))
    return model_lib.unembed(params, h)


@pytest.mark.parametrize("T", [24, pytest.param(21, marks=SLOW)])
def test_sliding_n1_attention_only_is_a_sliding_window_transformer(T):
    """Catches: context keys at the wrong positions, a context that is not carried, an off-by-one window."""
    params = model(layers=("attn", "attn"), eviction="sliding")
    tokens = random_tokens(case_key("slide-ref", T), 2, T)
    logits = sleepjax.forward(params, tokens, jnp.ones((2, T), bool))
    assert rel_err(logits, sliding_attention_reference(params, tokens)) < 1e-5
    hard = sleepjax.forward(params.replace(config=params.config.replace(eviction="hard")), tokens,
                            jnp.ones((2, T), bool))
    assert rel_err(hard[:, 8:], logits[:, 8:]) > 1e-3, "sliding must differ from hard after the first window"
    assert rel_err(hard[:, :8], logits[:, :8]) < 1e-6, "the first window has no context under either policy"


@pytest.mark.parametrize("sleep_n,T,sleep_layers", [pytest.param(1, 27, None, marks=SLOW),
                                                   pytest.param(3, 24, None, marks=SLOW),
                                                   pytest.param(3, 21, (1, 3), marks=SLOW), (2, 16, (0, 2))])
def test_sliding_forward_equals_stream(sleep_n, T, sleep_layers):
    """Training (Algorithm 1 with the previous window's wake keys/values as context) and streaming (token by token,
    sleeping at each full window) agree. Every window before the current one sleeps (nothing supervised there)."""
    params = model(sleep_n, eviction="sliding", sleep_layers=sleep_layers)
    tokens = random_tokens(case_key("slide-stream", sleep_n, T, sleep_layers), 2, T)
    L = params.config.window
    logits, stream = run_stream(params, tokens)
    start = (T - 1) // L * L  # the window the stream is in (or has just slept)
    mask = np.zeros((2, T), bool)
    mask[:, start:] = True
    ref, state = sleepjax.forward(params, tokens, mask, return_state=True)
    assert rel_err(logits[:, start:], ref[:, start:]) < 1e-5
    if T % L == 0:  # the stream just slept over the last window: compare the state with a forward that sleeps there
        _, slept = sleepjax.forward(params, tokens, np.zeros((2, T), bool), return_state=True)
        assert_trees_close(stream.fast_weights, slept, 1e-5, "state after sleep")
    else:
        assert_trees_close(stream.fast_weights, state, 1e-5, "state")


def test_sliding_context_is_the_wake_pass():
    """The keys/values a slept window leaves behind are those of its first (wake) pass: consolidating with N = 3 or
    N = 1 changes the fast weights but not the context the next window sees."""
    params = model(3, eviction="sliding")
    tokens = random_tokens(case_key("wake-kv"), 2, 8)
    state = sleepjax.init_state(params, 2)
    kv = sleepjax.window_kv(params, tokens, state)
    _, _, kv_n3 = model_lib.run_passes(params, model_lib.embed(params, tokens), state, 3,
                                       context=model_lib._no_context(params, 2))
    assert_trees_close(kv_n3, kv, 1e-6, "kept kv")
    next_ctx = random_tokens(case_key("wake-kv-next"), 2, 8)
    s3 = sleepjax.consolidate(params, sleepjax.consolidate(params, state, tokens), next_ctx, context=kv)
    s3_blind = sleepjax.consolidate(params, sleepjax.consolidate(params, state, tokens), next_ctx)
    assert min(rel_err(a, b) for a, b in zip(s3, s3_blind)) > 1e-3, "the context must reach the next window"


def test_sleep_layers_loop_only_their_layers():
    """sleep_layers=(1, 3) of 4: layer 0 once, layers 1-2 N times, layer 3 once on the last pass's output."""
    params = model(3, layers=("attn", "gdn", "attn", "gdn"), sleep_layers=(1, 3))
    ctx = random_tokens(case_key("sleep-layers"), 2, 8)
    state = sleepjax.init_state(params, 2)
    h = model_lib.embed(params, ctx)
    h, state_ref = model_lib.blocks_pass(params, h, state, lo=0, hi=1)
    for _ in range(3):
        h, state_ref = model_lib.blocks_pass(params, h, state_ref, lo=1, hi=3)
    h, state_ref = model_lib.blocks_pass(params, h, state_ref, lo=3, hi=4)
    assert_trees_close(sleepjax.consolidate(params, state, ctx), state_ref, 1e-5, "sleep_layers")
    all_layers = params.replace(config=params.config.replace(sleep_layers=None))
    full = sleepjax.consolidate(all_layers, state, ctx)
    assert rel_err(full[1], state_ref[1]) > 1e-3, "looping every layer must differ"


def test_sliding_bad_context():
    params = model(2, eviction="sliding")
    ctx = random_tokens(case_key("bad-ctx"), 2, 8)
    state = sleepjax.init_state(params, 2)
    with pytest.raises(ValueError, match="context must be a tuple of 2"):
        sleepjax.consolidate(params, state, ctx, context=((jnp.zeros((2, 4, 1, 16)),) * 2,) * 2)
    hard = params.replace(config=params.config.replace(eviction="hard"))
    kv = sleepjax.window_kv(params, ctx, state)
    with pytest.raises(ValueError, match="only used with eviction='sliding'"):
        sleepjax.consolidate(hard, state, ctx, context=kv)
