"""The XLA window attention (kernels/attention_xla.py) by query blocks against independent float64 references:
values (NumPy softmax) and gradients (float64 autodiff of one masked softmax over the whole window), for windows
split into several blocks, a short last block, sliding windows that skip keys, and grouped heads; and with the
previous window's keys in front (sliding eviction), by blocks and one query at a time."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers.compare import case_key, rel_err
from helpers.kernels import attention_float64_grads, make_qkv, numpy_attention
from sleepjax.kernels import attention, attention_xla

SLOW = pytest.mark.slow  # cases the default run skips (python -m pytest -m slow runs them)


@pytest.mark.parametrize("T,window", [(128, None), (129, None), (300, None), (300, 200), (300, 1), (1000, 130)])
def test_query_blocks_cover_exactly_the_visible_keys(T, window):
    blocks = attention_xla.query_blocks(T, window)
    assert blocks[0][0] == 0 and blocks[-1][1] == T
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    assert len(blocks) <= attention_xla.MAX_QUERY_BLOCKS
    for start, stop, key_start in blocks:
        earliest_visible = 0 if window is None else max(0, start - window + 1)
        assert key_start == earliest_visible  # nothing visible is cut, nothing before it is computed


# (B, T, H, Hkv, D, window, min block): the min block forces several blocks at test sizes
CASES = [
    (1, 300, 2, 1, 16, None, None),     # default blocks of 128: 3 blocks, the last short (44)
    (2, 45, 4, 2, 8, None, 16),         # blocks of 16, last one 13
    (1, 61, 2, 2, 16, 9, 16),           # sliding window: later blocks skip keys
    (1, 50, 2, 1, 16, 1, 8),            # window 1: each query sees itself only
    (1, 37, 2, 2, 8, 100, 8),           # window longer than the sequence
]
FAST_CASES = {CASES[2]}  # the default run's; the others run with -m slow


def _case_id(c):
    return "B{}-T{}-H{}kv{}-D{}-w{}-blk{}".format(*c)


@pytest.mark.parametrize("case", [c if c in FAST_CASES else pytest.param(c, marks=SLOW, id=_case_id(c)) for c in CASES],
                         ids=_case_id)
def test_blocked_attention_matches_float64_references(case, monkeypatch):
    B, T, H, Hkv, D, window, block = case
    if block is not None:
        monkeypatch.setattr(attention_xla, "MIN_QUERY_BLOCK", block)
    assert len(attention_xla.query_blocks(T, window)) > 1
    q, k, v = make_qkv(case_key("xla-attn", case), B, T, H, Hkv, D)
    cot = jax.random.normal(case_key("xla-attn-cot", case), q.shape)

    def f(q, k, v):
        o = attention.window_attention(q, k, v, sliding_window=window, backend="xla")
        return jnp.sum(o * cot), o

    (_, o), grads = jax.value_and_grad(f, (0, 1, 2), has_aux=True)(q, k, v)
    assert rel_err(o, numpy_attention(q, k, v, window)) < 1e-5
    for got, want in zip(grads, attention_float64_grads(q, k, v, window, cot)):
        assert rel_err(got, want) < 1e-5


def test_many_blocks_are_capped():
    """A long window is cut into at most MAX_QUERY_BLOCKS blocks (each is an unrolled piece of the graph)."""
    blocks = attention_xla.query_blocks(8192)
    assert len(blocks) == attention_xla.MAX_QUERY_BLOCKS and blocks[0][1] == 8192 // attention_xla.MAX_QUERY_BLOCKS


# (B, T, H, Hkv, D, context length, window, min block): queries after a previous window's keys
CONTEXT_CASES = [
    (2, 8, 2, 1, 16, 8, 8, None),       # the model's case: context and sliding window both L, one block
    (1, 45, 4, 2, 8, 40, 40, 16),       # several blocks, each reaching into the context
    (1, 30, 2, 2, 8, 12, 9, 8),         # a window shorter than the context: the later blocks skip all of it
]
FAST_CONTEXT_CASES = {CONTEXT_CASES[2]}


def _context_case_id(c):
    return "B{}-T{}-H{}kv{}-D{}-ctx{}-w{}-blk{}".format(*c)


@pytest.mark.parametrize("has_context", [True, False])
@pytest.mark.parametrize("case", [c if c in FAST_CONTEXT_CASES else pytest.param(c, marks=SLOW, id=_context_case_id(c))
                                  for c in CONTEXT_CASES], ids=_context_case_id)
def test_context_attention_is_the_whole_sequence(case, has_context, monkeypatch):
    """With the context: the last T rows of one sliding-window attention over [context | window]; without it: the
    window alone. Values and gradients against float64, and the cached one-query step gives every row (stale
    cache slots after the query ignored)."""
    B, T, H, Hkv, D, C, window, block = case
    if block is not None:
        monkeypatch.setattr(attention_xla, "MIN_QUERY_BLOCK", block)
        assert len(attention_xla.query_blocks(T, window, C)) > 1
    q, k, v = make_qkv(case_key("ctx-attn", case), B, C + T, H, Hkv, D)
    cot = jax.random.normal(case_key("ctx-attn-cot", case), (B, T, H, D))
    kwargs = dict(sliding_window=window, context_len=C, has_context=jnp.asarray(has_context))

    def f(q, k, v):
        o = attention_xla.xla_window_attention(q, k, v, **kwargs)
        return jnp.sum(o * cot), o

    (_, o), grads = jax.value_and_grad(f, (0, 1, 2), has_aux=True)(q[:, C:], k, v)
    if has_context:
        want = numpy_attention(q, k, v, window)[:, C:]
        gq, gk, gv = attention_float64_grads(q, k, v, window, jnp.pad(cot, ((0, 0), (C, 0), (0, 0), (0, 0))))
        want_grads = gq[:, C:], gk, gv
    else:
        want = numpy_attention(q[:, C:], k[:, C:], v[:, C:], window)
        gq, gk, gv = attention_float64_grads(q[:, C:], k[:, C:], v[:, C:], window, cot)
        want_grads = gq, *(np.pad(g, ((0, 0), (C, 0), (0, 0), (0, 0))) for g in (gk, gv))
    assert rel_err(o, want) < 1e-5
    for got, expected in zip(grads, want_grads):
        assert rel_err(got, expected) < 1e-5
    step = jax.jit(lambda q, k, v, position: attention_xla.cached_attention_step(q, k, v, position, **kwargs))
    for position in (0, T // 2, T - 1):
        stale = lambda x: x.at[:, C + position + 1:].set(1e3)
        row = step(q[:, C + position], stale(k), stale(v), jnp.asarray(position, jnp.int32))
        assert rel_err(row, want[:, position]) < 1e-5
