"""Streaming wake: one token at a time with a window-local KV cache; the stream sleeps by itself.

When the window fills, the fast weights are re-derived by ``consolidate`` (N passes) from the S saved at the
window's start over the window's tokens, and the caches are cleared (sliding eviction: the window's keys and
values stay visible to the next window, whose tokens each see the L tokens up to themselves). Per-token cost depends on the window
size L, never on how long the stream has run. For N = 1 the slept S equals the one the wake path produced.

A stream is batch-wide (``stream_init``: one position for every sequence, as before) or per-example
(``stream_init(..., per_example=True)`` or ``stream_prefill``): each sequence then has its own position in its own
windows, counted from its own first token, and sleeps when ITS window fills. A per-example step runs the one-token
path with a slot per sequence and sleeps under one ``lax.cond`` on "some window is full": the batch computes the
consolidation (``jax.vmap`` over batch-of-one views: each sequence with its own context flag) and only the
sequences whose window filled keep it.
``stream_prefill`` consumes prompts of different lengths window by window (a full window in parallel, then its
N passes; the last, partial window in one parallel wake pass) into the per-example stream that feeding them token
by token would give.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from sleepjax import layers
from sleepjax.config import ATTENTION_KINDS, FAST_WEIGHT_KINDS
from sleepjax.model import (FastWeights, Params, check_state, check_tokens, embed, init_state, layers_pass, of_kind,
                            per_layer, run_passes, sleep, unembed)


@flax.struct.dataclass
class Stream:
    fast_weights: FastWeights  # S after every token seen so far, one [B, Hv, Dk, Dv] per GDN layer
    window_start: FastWeights  # S at the start of the current window: where sleep starts from
    window_tokens: jax.Array  # int32 [B, L]: the current window's tokens (slots >= position are stale)
    kv_cache: tuple  # per attention layer (k, v), each [B, L, Hkv, D] (sliding eviction: keys before RoPE)
    context_kv: tuple  # sliding eviction: per attention layer the previous window's (k, v) as in kv_cache; else ()
    has_context: jax.Array  # bool scalar ([B] per-example): context_kv holds a previous window
    conv_cache: tuple  # per GDN / JetBlock layer [B, K-1, C]: the last raw (v) projections of this window
    position: jax.Array  # int32 scalar ([B] per-example): slot of the next token in the window
    sleeps: jax.Array  # int32 scalar ([B] per-example): windows consolidated so far

    @property
    def per_example(self) -> bool:
        """Whether each sequence has its own position (and windows), see ``stream_init``."""
        return self.position.ndim == 1


_PER_SEQUENCE = ("position", "sleeps", "has_context")  # scalars of a batch-wide stream, [B] of a per-example one


def _empty_caches(params: Params, batch_size: int):
    cfg = params.config
    dtype = layers.dtype_of(cfg)
    kv_shape = (batch_size, cfg.window, cfg.attn_kv_heads, cfg.attn_head_dim)
    kv = tuple((jnp.zeros(kv_shape, dtype), jnp.zeros(kv_shape, dtype)) for _ in range(cfg.num_attn_layers))
    conv = tuple(jnp.zeros((batch_size,) + layers.conv_cache_shape(cfg, kind), dtype) for kind in cfg.stack
                 if kind in FAST_WEIGHT_KINDS)
    return kv, conv


def stream_init(params: Params, batch_size: int, state: FastWeights | None = None, *,
                per_example: bool = False) -> Stream:
    """A fresh stream for ``batch_size`` sequences (fast weights zero unless ``state`` is given).

    ``per_example``: every sequence keeps its own position, sleep count and context flag ([B] instead of scalars),
    so sequences may sit at different slots of their windows (``stream_step`` then also takes ``active``)."""
    state = init_state(params, batch_size) if state is None else state
    kv, conv = _empty_caches(params, batch_size)
    shape = (batch_size,) if per_example else ()
    return Stream(fast_weights=state, window_start=state,
                  window_tokens=jnp.zeros((batch_size, params.config.window), jnp.int32), kv_cache=kv,
                  context_kv=kv if params.config.eviction == "sliding" else (),
                  has_context=jnp.zeros(shape, bool), conv_cache=conv, position=jnp.zeros(shape, jnp.int32),
                  sleeps=jnp.zeros(shape, jnp.int32))


def _layer_carries(params: Params, stream: Stream) -> tuple:
    """The stream's caches and fast weights as the layer loop takes them: one ``layers.Carry`` per layer."""
    cfg = params.config
    contexts = ([(*kv, stream.has_context) for kv in stream.context_kv] if cfg.eviction == "sliding"
                else [None] * cfg.num_attn_layers)
    return per_layer(cfg, [layers.Carry(kv=kv, context=c) for kv, c in zip(stream.kv_cache, contexts)],
                     [layers.Carry(fast=s, conv=c) for s, c in zip(stream.fast_weights, stream.conv_cache)])


def _wake_token(params: Params, stream: Stream, token):
    """The model on one token with the caches: returns (logits [B, V], stream with caches and S updated)."""
    cfg = params.config
    h, carries = layers_pass(params, embed(params, token), _layer_carries(params, stream),
                             layers.Span(position=stream.position))
    attn, gdn = of_kind(cfg, carries, "attn"), of_kind(cfg, carries, "gdn")
    window_tokens = layers.write_slot(stream.window_tokens, token.astype(jnp.int32), stream.position)
    stream = stream.replace(fast_weights=tuple(c.fast for c in gdn), kv_cache=tuple(c.kv for c in attn),
                            conv_cache=tuple(c.conv for c in gdn), window_tokens=window_tokens,
                            position=stream.position + 1)
    return unembed(params, h), stream


def _sleep(params: Params, stream: Stream, consolidate: bool = True) -> Stream:
    """Consolidate the full window from the S at its start, then clear the caches. Sliding eviction: the window's
    keys/values (those of its wake pass: the ones the stream computed token by token) become the context.
    ``consolidate`` False: close the window without sleeping (Algorithm 1's wake window): S stays the one the wake
    produced, the caches are cleared all the same, and ``sleeps`` does not count it."""
    sliding = params.config.eviction == "sliding"
    if consolidate:
        context = tuple((k, v, stream.has_context) for k, v in stream.context_kv) if sliding else None
        state = sleep(params, stream.window_start, stream.window_tokens, params.config.sleep_n, context)
    else:
        state = stream.fast_weights
    kv, conv = _empty_caches(params, stream.window_tokens.shape[0])
    return stream.replace(fast_weights=state, window_start=state, kv_cache=kv, conv_cache=conv,
                          context_kv=stream.kv_cache if sliding else (), has_context=jnp.asarray(sliding),
                          position=jnp.zeros((), jnp.int32), sleeps=stream.sleeps + int(consolidate))


def stream_step(params: Params, stream: Stream, token, *, active=None, consolidate: bool = True
                ) -> tuple[jax.Array, Stream]:
    """Feed one token [B] (int32). Returns the logits predicting the next token [B, V] and the new stream.

    One function serves wake and sleep (``lax.cond`` on a full window), so one ``jax.jit`` compiles both.
    A per-example stream (``stream_init(per_example=True)``, ``stream_prefill``) advances every sequence in its own
    window and sleeps those whose window fills; ``active`` (bool [B], per-example streams only; None = all) leaves
    the others as they were (their logits are computed but mean nothing; only the cache and window slots at their
    position, which are stale until their next token, take the token). ``consolidate`` False closes a
    full window without its N passes (what Algorithm 1 does with a supervised window).
    """
    check_tokens("token", token, params.config, 1, "[B]")
    if token.shape[0] != stream.window_tokens.shape[0]:
        raise ValueError(f"token must have shape [B={stream.window_tokens.shape[0]}] (the stream's batch size), "
                         f"got {tuple(token.shape)}")
    if stream.per_example:
        return _step_each(params, stream, token, active, consolidate)
    if active is not None:
        raise ValueError("active needs a per-example stream (stream_init(..., per_example=True))")
    logits, stream = _wake_token(params, stream, token)
    full = stream.position == params.config.window
    stream = jax.lax.cond(full, lambda s: _sleep(params, s, consolidate), lambda s: s, stream)
    return logits, stream


# ---------------------------------------------------------------------------------------------------------------
# Per-example streams


def _one_of(stream: Stream) -> Stream:
    """One sequence of a per-example stream (inside ``jax.vmap``: leaves without the batch axis) as the batch-wide
    stream of batch 1 the one-token path takes."""
    kept = {name: getattr(stream, name) for name in _PER_SEQUENCE}
    batched = jax.tree_util.tree_map(lambda x: x[None], stream.replace(**dict.fromkeys(_PER_SEQUENCE)))
    return batched.replace(**kept)


def _from_one(stream: Stream) -> Stream:
    """The inverse of ``_one_of``."""
    kept = {name: getattr(stream, name) for name in _PER_SEQUENCE}
    return jax.tree_util.tree_map(lambda x: x[0], stream.replace(**dict.fromkeys(_PER_SEQUENCE))).replace(**kept)


def _select(keep, new, old):
    """Per sequence: ``new`` where keep [B] is True, else ``old`` (trees whose leaves all lead with the batch axis)."""
    return jax.tree_util.tree_map(
        lambda a, b: jnp.where(keep.reshape(keep.shape + (1,) * (a.ndim - 1)), a, b), new, old)


def _step_each(params: Params, stream: Stream, token, active, consolidate: bool):
    logits, new = _wake_token(params, stream, token)  # the one-token path takes a slot per sequence
    if active is not None:
        # What an inactive sequence's token changed: its fast weights, conv cache and position, and the cache and
        # window slots at its position (stale: nothing reads them before its next token writes them).
        active = jnp.asarray(active, bool)
        kept = ("fast_weights", "conv_cache", "position")
        new = new.replace(**_select(active, {k: getattr(new, k) for k in kept}, {k: getattr(stream, k) for k in kept}))
    full = new.position == params.config.window
    sleep_one = lambda s: _from_one(_sleep(params, _one_of(s), consolidate))
    new = jax.lax.cond(jnp.any(full), lambda s: _select(full, jax.vmap(sleep_one)(s), s), lambda s: s, new)
    return logits, new


def stream_prefill(params: Params, tokens, lengths, *, wake=None, state: FastWeights | None = None) -> Stream:
    """The per-example stream after feeding sequence b its tokens[b, :lengths[b]] one by one (``stream_step``),
    computed window by window: each full window in parallel with its consolidation (N passes, which also give
    the wake keys/values that sliding eviction keeps), then each sequence's last, partial window in one parallel
    wake pass that fills the caches the one-token path would have filled. Equal to the token-by-token stream up to
    float rounding (the window and one-token paths sum in different orders).

    tokens int32 [B, T] (T any length; pad with any valid id), lengths int [B] in [0, T]; ``wake`` (bool [B, T],
    optional): positions whose full window closes without sleeping (Algorithm 1: a window with a supervised
    position runs one pass; ``stream_step(consolidate=False)``'s window); ``state``: the fast weights at each
    sequence's first token (default zeros). A window holding the T-th token of no sequence costs nothing
    (``lax.cond``); the compiled call depends only on the shapes, not on the lengths.
    """
    cfg = params.config
    check_tokens("tokens", tokens, cfg, 2, "[B, T]")
    B, T = tokens.shape
    if not hasattr(lengths, "shape") and not isinstance(lengths, (list, tuple)):
        raise ValueError(f"lengths must be an int array [B={B}], got {type(lengths).__name__}")
    lengths = jnp.asarray(lengths)
    if lengths.shape != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be an int array [B={B}], got {lengths.dtype} {tuple(lengths.shape)}")
    if not isinstance(lengths, jax.core.Tracer) and B and (int(lengths.min()) < 0 or int(lengths.max()) > T):
        raise ValueError(f"lengths must lie in [0, T={T}], got range [{int(lengths.min())}, {int(lengths.max())}]")
    if wake is not None and tuple(jnp.shape(wake)) != (B, T):
        raise ValueError(f"wake must be a bool array [B, T] = {(B, T)} like tokens, got {tuple(jnp.shape(wake))}")
    state = init_state(params, B) if state is None else state
    check_state(state, params, B)

    L, sliding = cfg.window, cfg.eviction == "sliding"
    W = max(1, -(-T // L))
    tokens = jnp.pad(jnp.asarray(tokens, jnp.int32), ((0, 0), (0, W * L - T)))
    lengths = lengths.astype(jnp.int32)
    full = lengths // L  # complete windows of each sequence
    rest = lengths - full * L  # its tokens in the window it is in
    by_window = tokens.reshape(B, W, L).swapaxes(0, 1)  # [W, B, L]
    sleeps_in = (jnp.ones((W, B), bool) if wake is None else
                 ~jnp.pad(jnp.asarray(wake, bool), ((0, 0), (0, W * L - T))).reshape(B, W, L).any(2).T)
    kv0, _ = _empty_caches(params, B)
    context0 = kv0 if sliding else ()

    def full_window(carry, xs):
        state, context, sleeps = carry
        w, window, sleeps_here = xs
        done = w < full  # the sequences for which window w is complete

        def run(args):
            state, context = args
            ctx = tuple((k, v, w > 0) for k, v in context) if sliding else None
            _, new, kv = run_passes(params, embed(params, window), state, cfg.sleep_n,
                                    sleeps=None if wake is None else sleeps_here, context=ctx)
            return _select(done, new, state), _select(done, kv, context) if sliding else ()

        state, context = jax.lax.cond(jnp.any(done), run, lambda args: args, (state, context))
        return (state, context, sleeps + (done & sleeps_here).astype(jnp.int32)), None

    (state, context, sleeps), _ = jax.lax.scan(
        full_window, (state, context0, jnp.zeros((B,), jnp.int32)), (jnp.arange(W), by_window, sleeps_in))

    # The window each sequence is in: its first ``rest`` tokens in one wake pass (a window past the end is clamped
    # to the last one: its rest is 0, so nothing of it is kept).
    window = jax.vmap(lambda t, f: jax.lax.dynamic_slice_in_dim(t, f * L, L))(tokens, jnp.minimum(full, W - 1))
    has_context = (full > 0) & sliding

    def partial_one(state, window, rest, context, has_context):
        ctx = tuple((k[None], v[None], has_context) for k, v in context) if sliding else None
        fast, kv, conv = _partial_window(params, tuple(s[None] for s in state), window[None], rest, ctx)
        return jax.tree_util.tree_map(lambda x: x[0], (fast, kv, conv))

    fast, kv, conv = jax.vmap(partial_one)(state, window, rest, context, has_context)
    fast = _select(rest > 0, fast, state)
    window = jnp.where(jnp.arange(L) < rest[:, None], window, 0)
    return Stream(fast_weights=fast, window_start=state, window_tokens=window, kv_cache=kv, context_kv=context,
                  has_context=has_context, conv_cache=conv, position=rest, sleeps=sleeps)


def _partial_window(params: Params, state: FastWeights, window, rest, context):
    """One sequence's window [1, L] of which the first ``rest`` tokens are real, in one wake pass: (its fast
    weights after them, every attention layer's cache (k, v) and every fast-weight layer's conv cache as the
    one-token path leaves them after those tokens). ``context``: sliding eviction's (k, v, has_context) per
    attention layer, else None."""
    cfg = params.config
    L, sliding = cfg.window, context is not None
    valid = jnp.arange(L) < rest
    h = embed(params, window)
    if sliding:
        zeros = jnp.zeros((1, L, cfg.attn_kv_heads, cfg.attn_head_dim), h.dtype)
        attn = [layers.Carry(kv=(zeros, zeros), context=c) for c in context]
    else:
        attn = [layers.Carry()] * cfg.num_attn_layers
    carries = per_layer(cfg, attn, [layers.Carry(fast=s) for s in state])
    kv, conv = [], []
    for i, kind in enumerate(cfg.stack):
        # What the one-token path caches comes from each layer's block input: read it, then run the layer.
        p = params.layers[cfg.weights_of(i)]
        x = layers.norm(h, p["norm1"], cfg)
        if kind in ATTENTION_KINDS:  # keys after RoPE under hard eviction, before it under sliding
            _, k, v = layers.attention_projections(p, x, cfg)
            if not sliding:
                k = layers.rope(k, jnp.arange(L), cfg.rope_theta, cfg.rope_dim)
            kv.append(tuple(jnp.where(valid[None, :, None, None], y, 0).astype(layers.dtype_of(cfg)) for y in (k, v)))
        else:  # the raw projections of the last K-1 real tokens, zeros before the window's start
            raw = layers.dense(x, p["w_qkv"] if kind == "gdn" else p["wv"])
            taps = layers.conv_cache_shape(cfg, kind)[0]
            raw = jnp.pad(raw, ((0, 0), (taps, 0), (0, 0)))
            conv.append(jax.lax.dynamic_slice_in_dim(raw, rest, taps, axis=1).astype(layers.dtype_of(cfg)))
        h, carries = layers_pass(params, h, carries, layers.Span(valid=valid), lo=i, hi=i + 1)
    return tuple(c.fast for c in of_kind(cfg, carries, "gdn")), tuple(kv), tuple(conv)
