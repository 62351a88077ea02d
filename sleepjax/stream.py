"""Streaming wake: one token at a time with a window-local KV cache; the stream sleeps by itself.

When the window fills, the fast weights are re-derived by ``consolidate`` (N passes) from the S saved at the
window's start over the window's tokens, and the caches are cleared (sliding eviction: the window's keys and
values stay visible to the next window, whose tokens each see the L tokens up to themselves). Per-token cost depends on the window
size L, never on how long the stream has run. For N = 1 the slept S equals the one the wake path produced.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from sleepjax import layers
from sleepjax.config import FAST_WEIGHT_KINDS
from sleepjax.model import (FastWeights, Params, check_tokens, embed, init_state, layers_pass, of_kind, per_layer,
                            sleep, unembed)


@flax.struct.dataclass
class Stream:
    fast_weights: FastWeights  # S after every token seen so far, one [B, Hv, Dk, Dv] per GDN layer
    window_start: FastWeights  # S at the start of the current window: where sleep starts from
    window_tokens: jax.Array  # int32 [B, L]: the current window's tokens (slots >= position are stale)
    kv_cache: tuple  # per attention layer (k, v), each [B, L, Hkv, D] (sliding eviction: keys before RoPE)
    context_kv: tuple  # sliding eviction: per attention layer the previous window's (k, v) as in kv_cache; else ()
    has_context: jax.Array  # bool scalar: context_kv holds a previous window
    conv_cache: tuple  # per GDN / JetBlock layer [B, K-1, C]: the last raw (v) projections of this window
    position: jax.Array  # int32 scalar: slot of the next token in the window
    sleeps: jax.Array  # int32 scalar: windows consolidated so far


def _empty_caches(params: Params, batch_size: int):
    cfg = params.config
    dtype = layers.dtype_of(cfg)
    kv_shape = (batch_size, cfg.window, cfg.attn_kv_heads, cfg.attn_head_dim)
    kv = tuple((jnp.zeros(kv_shape, dtype), jnp.zeros(kv_shape, dtype)) for _ in range(cfg.num_attn_layers))
    conv = tuple(jnp.zeros((batch_size,) + layers.conv_cache_shape(cfg, kind), dtype) for kind in cfg.stack
                 if kind in FAST_WEIGHT_KINDS)
    return kv, conv


def stream_init(params: Params, batch_size: int, state: FastWeights | None = None) -> Stream:
    """A fresh stream for ``batch_size`` sequences (fast weights zero unless ``state`` is given)."""
    state = init_state(params, batch_size) if state is None else state
    kv, conv = _empty_caches(params, batch_size)
    return Stream(fast_weights=state, window_start=state,
                  window_tokens=jnp.zeros((batch_size, params.config.window), jnp.int32), kv_cache=kv,
                  context_kv=kv if params.config.eviction == "sliding" else (),
                  has_context=jnp.zeros((), bool), conv_cache=conv, position=jnp.zeros((), jnp.int32),
                  sleeps=jnp.zeros((), jnp.int32))


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
    window_tokens = jax.lax.dynamic_update_slice_in_dim(stream.window_tokens, token[:, None].astype(jnp.int32),
                                                        stream.position, axis=1)
    stream = stream.replace(fast_weights=tuple(c.fast for c in gdn), kv_cache=tuple(c.kv for c in attn),
                            conv_cache=tuple(c.conv for c in gdn), window_tokens=window_tokens,
                            position=stream.position + 1)
    return unembed(params, h), stream


def _sleep(params: Params, stream: Stream) -> Stream:
    """Consolidate the full window from the S at its start, then clear the caches. Sliding eviction: the window's
    keys/values (those of its wake pass: the ones the stream computed token by token) become the context."""
    sliding = params.config.eviction == "sliding"
    context = tuple((k, v, stream.has_context) for k, v in stream.context_kv) if sliding else None
    state = sleep(params, stream.window_start, stream.window_tokens, params.config.sleep_n, context)
    kv, conv = _empty_caches(params, stream.window_tokens.shape[0])
    return stream.replace(fast_weights=state, window_start=state, kv_cache=kv, conv_cache=conv,
                          context_kv=stream.kv_cache if sliding else (), has_context=jnp.asarray(sliding),
                          position=jnp.zeros((), jnp.int32), sleeps=stream.sleeps + 1)


def stream_step(params: Params, stream: Stream, token) -> tuple[jax.Array, Stream]:
    """Feed one token [B] (int32). Returns the logits predicting the next token [B, V] and the new stream.

    One function serves wake and sleep (``lax.cond`` on a full window), so one ``jax.jit`` compiles both.
    """
    check_tokens("token", token, params.config, 1, "[B]")
    if token.shape[0] != stream.window_tokens.shape[0]:
        raise ValueError(f"token must have shape [B={stream.window_tokens.shape[0]}] (the stream's batch size), "
                         f"got {tuple(token.shape)}")
    logits, stream = _wake_token(params, stream, token)
    full = stream.position == params.config.window
    stream = jax.lax.cond(full, lambda s: _sleep(params, s), lambda s: s, stream)
    return logits, stream
