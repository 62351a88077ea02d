"""The XLA window attention (kernels/attention_xla.py) by query blocks against independent float64 references:
values (NumPy softmax) and gradients (float64 autodiff of one masked softmax over the whole window), for windows
split into several blocks, a short last block, sliding windows that skip keys, and grouped heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import case_key, rel_err
from sleepjax.kernels import attention, attention_xla
from test_pallas_attention import float64_grads, make_qkv, numpy_attention


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


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-T{}-H{}kv{}-D{}-w{}-blk{}".format(*c))
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
    for got, want in zip(grads, float64_grads(q, k, v, window, cot)):
        assert rel_err(got, want) < 1e-5


def test_many_blocks_are_capped():
    """A long window is cut into at most MAX_QUERY_BLOCKS blocks (each is an unrolled piece of the graph)."""
    blocks = attention_xla.query_blocks(8192)
    assert len(blocks) == attention_xla.MAX_QUERY_BLOCKS and blocks[0][1] == 8192 // attention_xla.MAX_QUERY_BLOCKS
