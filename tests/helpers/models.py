"""Small sleepjax models for model-level tests, random tokens, and the stream run token by token."""

import jax
import jax.numpy as jnp
import numpy as np

import sleepjax

from .compare import case_key

# The small hybrid model of test_model.py / test_stream.py / test_model_eviction.py (default layer pattern).
SMALL = dict(vocab_size=11, d_model=32, attn_heads=2, attn_kv_heads=1, attn_head_dim=16, gdn_heads=1,
             gdn_value_heads=2, gdn_key_dim=16, gdn_value_dim=8, mlp_dim=64, window=8, chunk_size=16)

# The tiny 4-layer model compared against the float64 NumPy reference: grouped heads in attention (4 query heads
# on 2 key/value heads) and in GDN (4 value heads on 2 key heads), Dk != Dv.
TINY = dict(vocab_size=13, d_model=16, layers=("attn", "gdn", "attn", "gdn"), attn_heads=4, attn_kv_heads=2,
            attn_head_dim=8, gdn_heads=2, gdn_value_heads=4, gdn_key_dim=8, gdn_value_dim=4, mlp_dim=24, window=6,
            chunk_size=16)


def small_model(sleep_n=2, **overrides):
    cfg = sleepjax.ModelConfig(**{**SMALL, "sleep_n": sleep_n, **overrides})
    return sleepjax.init(cfg, case_key("init", sleep_n, tuple(sorted(overrides.items()))))


def random_tokens(key, B, T, V=11):
    return jax.random.randint(key, (B, T), 0, V, dtype=jnp.int32)


def perturb(params, key, scale=0.3):
    """Every leaf moved by scale * (its spread, or 1 for constant leaves such as norm weights) * N(0, 1), so that
    a weight read in the wrong place (norm1 for norm2, ones assumed) shows."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, x in zip(keys, leaves):
        spread = float(jnp.std(x)) or 1.0
        out.append(x + scale * spread * jax.random.normal(k, x.shape, x.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def make_params(tag, **overrides):
    """A TINY model (no remat), ``overrides`` applied, with random weights moved away from their initial values."""
    cfg = sleepjax.ModelConfig(**{**TINY, "remat": "none", **overrides})
    return perturb(sleepjax.init(cfg, case_key("init", tag)), case_key("perturb", tag))


def run_stream(params, tokens):
    """Logits [B, T, V] of ``stream_step`` fed one token at a time (jitted), and the final stream."""
    step = jax.jit(sleepjax.stream_step)
    stream = sleepjax.stream_init(params, tokens.shape[0])
    logits = []
    for t in range(tokens.shape[1]):
        out, stream = step(params, stream, tokens[:, t])
        logits.append(out)
    return jnp.stack(logits, axis=1), stream


def random_state(params, B, key, scale=0.5):
    """Random fast weights of the shapes ``sleepjax.init_state`` gives (a state away from zero)."""
    import sleepjax

    shapes = [s.shape for s in sleepjax.init_state(params, B)]
    return tuple(scale * jax.random.normal(k, s) for k, s in zip(jax.random.split(key, len(shapes)), shapes))


def mixed_mask(B, T):
    """A loss mask for windows of 6: window 0 sleeps, window 1 is supervised in the last example only, window 2
    sleeps, the short last window wakes in the first example only."""
    m = np.zeros((B, T), bool)
    m[B - 1, 7:9] = True
    m[0, T - 2] = True
    return m
