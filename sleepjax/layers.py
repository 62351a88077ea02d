"""The blocks of the model and their pieces, shared by the window path (``model.py``) and the one-token path
(``stream.py``): a block of each layer kind (``BLOCKS``) maps (params, x, carry, span) to (out, carry), so one layer
loop (``model.layers_pass``) serves a window, the sleep passes and a streamed token.

Every function is pure. Weights are stored float32 and cast to the activation dtype at use; gates, norms'
statistics and the fast weights stay float32.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sleepjax.config import ModelConfig
from sleepjax.kernels import gated_delta_rule, gated_delta_rule_step, window_attention
from sleepjax.kernels import sharding as kernel_sharding
from sleepjax.kernels.attention import cached_attention_step, xla_window_attention

BATCH_MESH_AXES = ("data", "fsdp")
HEAD_MESH_AXIS = "tensor"


def _active_mesh():
    """(mesh, batch axes, head axis) when tracing under ``jax.set_mesh`` with more than one device, else None.

    Under a mesh the mixers run inside ``jax.shard_map`` over batch and heads: a Pallas call is opaque to the
    SPMD partitioner, and both mixers are independent across batch rows and head groups, so each device runs
    the kernel on its own slice with no communication.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None
    batch = tuple(a for a in BATCH_MESH_AXES if mesh.shape.get(a, 1) > 1) or None
    head = HEAD_MESH_AXIS if mesh.shape.get(HEAD_MESH_AXIS, 1) > 1 else None
    return (mesh, batch, head) if batch or head else None


def _window_attention(q, k, v, cfg: ModelConfig, sliding_window=None):
    kwargs = {} if sliding_window is None or sliding_window >= q.shape[1] else {"sliding_window": sliding_window}
    sharded = _active_mesh()
    if sharded is None:
        return window_attention(q, k, v, backend=cfg.attn_backend, **kwargs)
    mesh, batch, head = sharded
    return kernel_sharding.sharded_window_attention(mesh, batch_axis=batch, head_axis=head,
                                                    backend=cfg.attn_backend, **kwargs)(q, k, v)


def _gated_delta_rule(q, k, v, g, beta, state, cfg: ModelConfig):
    kwargs = dict(use_delta=cfg.ssm_rule == "delta", chunk_size=cfg.chunk_size)
    sharded = _active_mesh()
    if sharded is None:
        return gated_delta_rule(q, k, v, g, beta, state, backend=cfg.gdn_backend, **kwargs)
    mesh, batch, head = sharded
    return kernel_sharding.sharded_gated_delta_rule(mesh, batch_axis=batch, head_axis=head, backend=cfg.gdn_backend,
                                                    **kwargs)(q, k, v, g, beta, state)


def dtype_of(cfg: ModelConfig):
    return jnp.dtype(cfg.dtype)


def dense(x, w):
    """x [..., d_in] @ w [d_in, d_out] as ONE 2-D matmul over the flattened leading dims. XLA:CPU lowers a
    [B, T, d] @ [d, f] product's gradient (a contraction over both B and T) with a full transposing copy of its
    operands: flattening first measured 1.7x faster for the MLP's forward + backward at B=2, T=1024, d=256."""
    lead = x.shape[:-1]
    return (x.reshape(-1, x.shape[-1]) @ w.astype(x.dtype)).reshape(lead + (w.shape[-1],))


def dense_many(x, weights):
    """[dense(x, w) for w in weights] as ONE matmul against the concatenated weights (then split): one pass over x
    forward and one matmul for its gradient, where separate projections of the same input each read x and each
    add a matmul to dx (measured 15% faster for the GDN block's four input projections, B=2, T=1024, d=256)."""
    if len(weights) == 1 or _active_mesh() is not None:  # under a mesh the weights' head shardings differ
        return [dense(x, w) for w in weights]
    y = dense(x, jnp.concatenate([w.astype(x.dtype) for w in weights], axis=1))
    return jnp.split(y, np.cumsum([w.shape[1] for w in weights])[:-1].tolist(), axis=-1)


def rms_norm(x, weight, eps, offset=0.0):
    """RMSNorm over the last axis in float32, scaled by ``offset + weight`` (offset 1.0: zero-centred weights)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * (offset + weight)).astype(x.dtype)


def norm(x, weight, cfg: ModelConfig):
    """The model's block and final norms (``norm_weight_offset`` applies to these)."""
    return rms_norm(x, weight, cfg.norm_eps, cfg.norm_weight_offset)


def mlp(p, x):
    """SwiGLU: [..., d] -> [..., d]."""
    return dense(jax.nn.silu(dense(x, p["w_gate"])) * dense(x, p["w_up"]), p["w_down"])


# ---------------------------------------------------------------------------------------------------------------
# What a block carries, and where it runs


class Carry(NamedTuple):
    """What one layer carries from token to token and from window to window; the fields of the other kind stay None.

    fast: GDN / JetBlock, the fast weights S [B, Hv, Dk, Dv] (float32): all that sleep consolidates and that crosses a
        window boundary by itself. Sleep passes thread it (pass n continues from pass n-1's S); a window's other fields
        are those of its wake (first) pass.
    conv: GDN / JetBlock, one token: the window's last K-1 raw projections [B, K-1, C] (the conv is window-local;
        a JetBlock keeps its raw v projections only).
    kv: attention: this window's (k, v), each [B, L, Hkv, D] (a window of T tokens: [B, T, Hkv, D]); see
        ``attention_block``.
    context: attention under sliding eviction: the previous window's (k, v, has_context).
    """

    fast: Any = None
    conv: Any = None
    kv: Any = None
    context: Any = None


class Span(NamedTuple):
    """What a block call covers: a whole window (``position`` None; ``valid`` [T] bool, False at padding, which
    leaves the fast weights untouched; None: every token real) or one token at slot ``position`` (int32 scalar, or
    [B]: each sequence at its own slot)."""

    position: Any = None
    valid: Any = None


# ---------------------------------------------------------------------------------------------------------------
# Attention


def rope(x, positions, theta, rotary_dim=None):
    """Rotary embedding on the first ``rotary_dim`` dims (default all) of each head, rotating their two halves.
    x [..., T, H, D] (or [..., H, D] with scalar positions); positions [T] or scalar."""
    rotary_dim = x.shape[-1] if rotary_dim is None else rotary_dim
    half = rotary_dim // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = jnp.asarray(positions, jnp.float32)[..., None] * freqs  # [T, half] or [half]
    angles = angles[..., None, :]  # broadcast over heads
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xf = x.astype(jnp.float32)
    x1, x2, rest = xf[..., :half], xf[..., half:rotary_dim], xf[..., rotary_dim:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], axis=-1).astype(x.dtype)


def attention_projections(p, x, cfg: ModelConfig, with_gate: bool = False):
    """x [..., d] -> q [..., H, D], k and v [..., Hkv, D] before RoPE (q/k normalised per head if ``qk_norm``).
    ``with_gate``: also the output gate's pre-activation x W_q_gate [..., H*D] (``attn_output_gate`` models), from
    the same fused matmul."""
    lead = x.shape[:-1]
    names = ("wq", "wk", "wv") + (("wq_gate",) if with_gate else ())
    q, k, v, *gate = dense_many(x, [p[n] for n in names])
    if cfg.attn_bias:
        q, k, v = (y + p[b].astype(y.dtype) for y, b in zip((q, k, v), ("bq", "bk", "bv")))
    q = q.reshape(lead + (cfg.attn_heads, cfg.attn_head_dim))
    k = k.reshape(lead + (cfg.attn_kv_heads, cfg.attn_head_dim))
    v = v.reshape(lead + (cfg.attn_kv_heads, cfg.attn_head_dim))
    if cfg.qk_norm:
        q, k = norm(q, p["q_norm"], cfg), norm(k, p["k_norm"], cfg)
    return (q, k, v, gate[0]) if with_gate else (q, k, v)


def _rope(x, positions, cfg: ModelConfig):
    return rope(x, positions, cfg.rope_theta, cfg.rope_dim)


def attention_qkv(p, x, positions, cfg: ModelConfig):
    """x [..., d] -> q [..., H, D], k and v [..., Hkv, D], RoPE applied at ``positions``."""
    q, k, v = attention_projections(p, x, cfg)
    return _rope(q, positions, cfg), _rope(k, positions, cfg), v


def attention_output(p, o, x, cfg: ModelConfig, gate=None):
    """o [..., H, D] -> [..., d]; with ``attn_output_gate`` each head is first scaled by sigmoid(x W_q_gate)
    (``gate``: that pre-activation when already computed, [..., H*D])."""
    if cfg.attn_output_gate:
        gate = (dense(x, p["wq_gate"]) if gate is None else gate).reshape(o.shape)
        o = (o.astype(jnp.float32) * jax.nn.sigmoid(gate.astype(jnp.float32))).astype(o.dtype)
    return dense(o.reshape(o.shape[:-2] + (-1,)), p["wo"])


def attention_block(p, x, carry: Carry, span: Span, cfg: ModelConfig, kind: str = "attn"):
    """The attention mixer as a block: x [B, T, d] (a whole window) or [B, d] (one token) -> (out, carry).

    carry.context (sliding eviction; None under hard eviction): the previous window's (k, v, has_context), keys
    before RoPE, each [B, L, Hkv, D], which every query also sees within the L positions up to itself (positions
    count from the context's start; has_context False: there is no previous window). carry.kv: this window's
    (k, v). One token writes its slot of them (keys after RoPE under hard eviction, before it under sliding); a
    whole window writes them all under sliding eviction (the next window's context) and keeps none under hard.
    ``kind`` "swa": every query sees only the last ``cfg.swa_window`` keys up to itself (within what the window and
    the eviction policy leave visible)."""
    q, k, v, *gate = attention_projections(p, x, cfg, with_gate=cfg.attn_output_gate)
    limit = cfg.attention_window(kind)
    if span.position is None:
        o, carry = _attend_window(q, k, v, carry, cfg, limit)
    else:
        o, carry = _attend_token(q, k, v, carry, span.position, cfg, limit)
    return attention_output(p, o, x, cfg, gate=gate[0] if gate else None), carry


def _after_context(context, q, k, v, query_positions, cfg: ModelConfig):
    """Sliding eviction: the keys (with RoPE) and values of [previous window | this window] and the queries at
    L + query_positions, positions counting from the context's start."""
    ctx_k, ctx_v, _ = context
    L = ctx_k.shape[1]
    keys = _rope(jnp.concatenate([ctx_k, k.astype(ctx_k.dtype)], axis=1), jnp.arange(L + k.shape[1]), cfg)
    values = jnp.concatenate([ctx_v, v.astype(ctx_v.dtype)], axis=1)
    return _rope(q, L + query_positions, cfg), keys, values


def _attend_window(q, k, v, carry: Carry, cfg: ModelConfig, limit=None):
    T = q.shape[1]
    if carry.context is None:  # the window alone: positions restart at 0; any backend
        positions = jnp.arange(T)
        return _window_attention(_rope(q, positions, cfg), _rope(k, positions, cfg), v, cfg, limit), carry
    L, has_context = carry.context[0].shape[1], carry.context[2]
    o = xla_window_attention(*_after_context(carry.context, q, k, v, jnp.arange(T), cfg),
                             sliding_window=L if limit is None else min(L, limit), context_len=L,
                             has_context=has_context)
    return o, carry._replace(kv=(k, v))


def _attend_token(q, k, v, carry: Carry, position, cfg: ModelConfig, limit=None):
    """One token at slot ``position``: an int32 scalar (every sequence at the same slot) or [B] (each sequence at
    its own slot of its own window: a per-example stream)."""
    if carry.context is None:  # hard eviction: a window's positions never move, so its keys are cached after RoPE
        q, k = _rope(q, position, cfg), _rope(k, position, cfg)
    k_cache, v_cache = (write_slot(cache, new, position) for cache, new in zip(carry.kv, (k, v)))
    carry = carry._replace(kv=(k_cache, v_cache))
    # The attention mask broadcasts against scores [B, Hkv, H/Hkv, 1, keys]: per-sequence slots as [B, 1, 1, 1, 1].
    slot = position.reshape(-1, 1, 1, 1, 1) if jnp.ndim(position) else position
    if carry.context is None:
        return cached_attention_step(q, k_cache, v_cache, slot, sliding_window=limit), carry
    # Sliding eviction: the cache keeps keys before RoPE, as the window becomes the next one's context L back.
    L, has_context = carry.context[0].shape[1], carry.context[2]
    if jnp.ndim(has_context):
        has_context = has_context.reshape(-1, 1, 1, 1, 1)
    o = cached_attention_step(*_after_context(carry.context, q, k_cache, v_cache, position, cfg), slot,
                              sliding_window=L if limit is None else min(L, limit), context_len=L,
                              has_context=has_context)
    return o, carry


def write_slot(cache, new, position):
    """cache [B, L, ...] with new [B, ...] written at slot ``position`` (scalar, or [B]: one slot per sequence)."""
    new = new[:, None].astype(cache.dtype)
    if not jnp.ndim(position):
        return jax.lax.dynamic_update_slice_in_dim(cache, new, position, axis=1)
    return cache.at[jnp.arange(cache.shape[0]), position].set(new[:, 0], mode="promise_in_bounds")


# ---------------------------------------------------------------------------------------------------------------
# Gated DeltaNet


def gdn_conv_channels(cfg: ModelConfig) -> int:
    return 2 * cfg.gdn_heads * cfg.gdn_key_dim + cfg.gdn_value_heads * cfg.gdn_value_dim


def causal_conv(x, w):
    """Depthwise causal conv within the window. x [B, T, C], w [K, C]: y_t = sum_i w_i x_{t-K+1+i}, zeros
    before the window start."""
    K, T = w.shape[0], x.shape[1]
    xp = jnp.pad(x, ((0, 0), (K - 1, 0), (0, 0)))
    return sum(xp[:, i:i + T] * w[i].astype(x.dtype) for i in range(K))


def _l2_normalize(x, eps=1e-6):
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def gdn_heads(p, conv_out, x, cfg: ModelConfig, ab=None):
    """Conv outputs [..., C] and block input x [..., d] -> q, k [..., Hk, Dk]; v [..., Hv, Dv]; g, beta [..., Hv]
    (float32; g = -exp(A_log) softplus(W_a x + dt_bias) <= 0, computed in log space). ``ab``: (x W_a, x W_b) in
    float32 when already computed."""
    lead = conv_out.shape[:-1]
    y = jax.nn.silu(conv_out)
    nq = cfg.gdn_heads * cfg.gdn_key_dim
    q = _l2_normalize(y[..., :nq].reshape(lead + (cfg.gdn_heads, cfg.gdn_key_dim)))
    k = _l2_normalize(y[..., nq:2 * nq].reshape(lead + (cfg.gdn_heads, cfg.gdn_key_dim)))
    v = y[..., 2 * nq:].reshape(lead + (cfg.gdn_value_heads, cfg.gdn_value_dim))
    a, b = dense_many(x.astype(jnp.float32), [p["w_a"], p["w_b"]]) if ab is None else ab
    g = -jnp.exp(p["a_log"]) * jax.nn.softplus(a + p["dt_bias"])
    beta = jax.nn.sigmoid(b)
    return q, k, v, g, beta


def gdn_output(p, o, x, cfg: ModelConfig, gate=None):
    """o [..., Hv, Dv] -> RMSNorm(o) per head * SiLU(W_gate x) -> W_o: [..., d] (``gate``: x W_gate [..., Hv*Dv]
    when already computed)."""
    o = rms_norm(o, p["o_norm"], cfg.norm_eps)  # norm_weight_offset does not apply here
    gate = jax.nn.silu(dense(x, p["w_gate"]) if gate is None else gate).reshape(o.shape)
    return dense((o * gate).reshape(o.shape[:-2] + (-1,)), p["wo"])


def gdn_window(p, x, state, cfg: ModelConfig, valid=None):
    """One window. x [B, T, d]; state [B, Hv, Dk, Dv] -> ([B, T, d], new state). ``valid`` [T] bool:
    at False (padding) positions g = beta = 0, so the fast weights are left exactly as they were.
    The four input projections are one matmul (``dense_many``); W_a, W_b act on float32 x, so with 16-bit
    activations they are a second one."""
    if x.dtype == jnp.float32:
        raw, gate, a, b = dense_many(x, [p["w_qkv"], p["w_gate"], p["w_a"], p["w_b"]])
        ab = (a, b)
    else:
        raw, gate = dense_many(x, [p["w_qkv"], p["w_gate"]])
        ab = None
    conv_out = causal_conv(raw, p["conv"])
    q, k, v, g, beta = gdn_heads(p, conv_out, x, cfg, ab=ab)
    o, state = _masked_delta_rule(q, k, v, g, beta, state, valid, cfg)
    return gdn_output(p, o, x, cfg, gate=gate), state


def _masked_delta_rule(q, k, v, g, beta, state, valid, cfg: ModelConfig):
    """The gated delta rule where padded positions (``valid`` [B, T] False) neither decay nor write the state."""
    if valid is not None:
        g = jnp.where(valid[:, None], g, 0.0)
        beta = jnp.where(valid[:, None], beta, 0.0)
    return _gated_delta_rule(q, k, v, g, beta, state, cfg)


def gdn_token(p, x, state, conv_cache, cfg: ModelConfig):
    """One token. x [B, d]; state [B, Hv, Dk, Dv]; conv_cache [B, K-1, C] (the previous raw projections
    of this window, zeros before its start)."""
    raw = dense(x, p["w_qkv"])
    taps = jnp.concatenate([conv_cache, raw[:, None].astype(conv_cache.dtype)], axis=1)  # [B, K, C]
    conv_out = jnp.sum(taps * p["conv"].astype(taps.dtype), axis=1).astype(x.dtype)
    q, k, v, g, beta = gdn_heads(p, conv_out, x, cfg)
    o, state = gated_delta_rule_step(q, k, v, g, beta, state, use_delta=cfg.ssm_rule == "delta")
    return gdn_output(p, o, x, cfg), state, taps[:, 1:]


def gdn_block(p, x, carry: Carry, span: Span, cfg: ModelConfig):
    """The GDN mixer as a block: x [B, T, d] (a whole window) or [B, d] (one token) -> (out, carry). carry.fast:
    the fast weights S; carry.conv: one token's conv cache (a whole window starts the conv from zeros)."""
    if span.position is None:
        out, state = gdn_window(p, x, carry.fast, cfg, span.valid)
        return out, carry._replace(fast=state)
    out, state, conv = gdn_token(p, x, carry.fast, carry.conv, cfg)
    return out, carry._replace(fast=state, conv=conv)


# ---------------------------------------------------------------------------------------------------------------
# JetBlock (Jet-Nemotron): GDN's gated delta rule; q, k = SiLU(x W), no conv; v = SiLU(dynamic conv of x W_v)


def jet_conv_kernels(p, x, cfg: ModelConfig):
    """The dynamic conv's per-token kernels from the block input x [..., d]: W2 SiLU(W1 x) + b2 as
    [..., C, K] (channel-major: channel c's taps, oldest first, the current token's last)."""
    flat = dense(jax.nn.silu(dense(x, p["conv_w1"])), p["conv_w2"]) + p["conv_b2"].astype(x.dtype)
    return flat.reshape(x.shape[:-1] + (cfg.jet_heads * cfg.jet_value_dim, cfg.jet_conv_size))


def jet_heads(p, x, q, k, conv_out, cfg: ModelConfig, ab=None):
    """q, k projections [..., H*Dk], the dynamic conv's output [..., H*Dv] and the block input x -> q, k
    [..., H, Dk] (SiLU, L2-normalised), v [..., H, Dv] (SiLU), g, beta [..., H] float32 (as ``gdn_heads``)."""
    lead = q.shape[:-1]
    H, Dk, Dv = cfg.jet_heads, cfg.jet_key_dim, cfg.jet_value_dim
    q = _l2_normalize(jax.nn.silu(q).reshape(lead + (H, Dk)))
    k = _l2_normalize(jax.nn.silu(k).reshape(lead + (H, Dk)))
    v = jax.nn.silu(conv_out).reshape(lead + (H, Dv))
    a, b = dense_many(x.astype(jnp.float32), [p["w_a"], p["w_b"]]) if ab is None else ab
    g = -jax.nn.softplus(a + p["dt_bias"]) * jnp.exp(p["a_log"])
    return q, k, v, g, jax.nn.sigmoid(b)


def jet_output(p, o, x, cfg: ModelConfig, gate=None):
    """As ``gdn_output``, with the JetBlock's own norm eps (``jet_norm_eps``)."""
    o = rms_norm(o, p["o_norm"], cfg.jet_norm_eps)
    gate = jax.nn.silu(dense(x, p["w_gate"]) if gate is None else gate).reshape(o.shape)
    return dense((o * gate).reshape(o.shape[:-2] + (-1,)), p["wo"])


def jet_window(p, x, state, cfg: ModelConfig, valid=None):
    """One window of a JetBlock. x [B, T, d]; state [B, H, Dk, Dv] -> ([B, T, d], new state). The dynamic conv is
    window-local (zeros before the window start), as GDN's conv; padding (``valid`` False) leaves S untouched."""
    names = ["wq", "wk", "wv", "w_gate"] + (["w_a", "w_b"] if x.dtype == jnp.float32 else [])
    q, k, u, gate, *ab = dense_many(x, [p[n] for n in names])
    kernels = jet_conv_kernels(p, x, cfg)  # [B, T, C, K]
    K, T = cfg.jet_conv_size, x.shape[1]
    up = jnp.pad(u, ((0, 0), (K - 1, 0), (0, 0)))
    conv_out = sum(up[:, j:j + T] * kernels[..., j] for j in range(K))
    q, k, v, g, beta = jet_heads(p, x, q, k, conv_out, cfg, ab=tuple(ab) or None)
    o, state = _masked_delta_rule(q, k, v, g, beta, state, valid, cfg)
    return jet_output(p, o, x, cfg, gate=gate), state


def jet_token(p, x, state, conv_cache, cfg: ModelConfig):
    """One token of a JetBlock. x [B, d]; state [B, H, Dk, Dv]; conv_cache [B, K-1, H*Dv]: the previous raw v
    projections of this window (zeros before its start)."""
    q, k, u = dense_many(x, [p["wq"], p["wk"], p["wv"]])
    taps = jnp.concatenate([conv_cache, u[:, None].astype(conv_cache.dtype)], axis=1)  # [B, K, C]
    kernels = jet_conv_kernels(p, x, cfg)  # [B, C, K]
    conv_out = jnp.sum(taps.swapaxes(1, 2) * kernels.astype(taps.dtype), axis=-1).astype(x.dtype)
    q, k, v, g, beta = jet_heads(p, x, q, k, conv_out, cfg)
    o, state = gated_delta_rule_step(q, k, v, g, beta, state, use_delta=cfg.ssm_rule == "delta")
    return jet_output(p, o, x, cfg), state, taps[:, 1:]


def jet_block(p, x, carry: Carry, span: Span, cfg: ModelConfig):
    """The JetBlock mixer as a block (as ``gdn_block``): carry.fast is S, carry.conv one token's dynamic-conv cache
    of raw v projections (a whole window starts the conv from zeros)."""
    if span.position is None:
        out, state = jet_window(p, x, carry.fast, cfg, span.valid)
        return out, carry._replace(fast=state)
    out, state, conv = jet_token(p, x, carry.fast, carry.conv, cfg)
    return out, carry._replace(fast=state, conv=conv)


def swa_block(p, x, carry: Carry, span: Span, cfg: ModelConfig):
    """Sliding-window attention: ``attention_block`` whose queries see at most ``cfg.swa_window`` keys."""
    return attention_block(p, x, carry, span, cfg, kind="swa")


def conv_cache_shape(cfg: ModelConfig, kind: str) -> tuple[int, int]:
    """(K-1, channels) of one token's conv cache of a layer of ``kind`` ("gdn" or "jet")."""
    if kind == "jet":
        return (cfg.jet_conv_size - 1, cfg.jet_heads * cfg.jet_value_dim)
    return (cfg.conv_size - 1, gdn_conv_channels(cfg))


BLOCKS = {"attn": attention_block, "gdn": gdn_block, "jet": jet_block, "swa": swa_block}  # each layer kind's block


# ---------------------------------------------------------------------------------------------------------------
# Output head


@jax.custom_vjp
def softmax_cross_entropy(logits, targets):
    """-log softmax(logits)[target] per position: logits [..., V] (float32), targets int [...] -> [...].

    Same values as ``-take_along_axis(log_softmax(logits), targets)``; the gradient is one fused pass,
    (softmax - onehot(target)) * d(ce), where autodiff's scatters the target column into a zeroed [..., V] array
    and differentiates the log-softmax separately (measured 3x slower on CPU at [2048, 2048])."""
    return _softmax_cross_entropy_fwd(logits, targets)[0]


def _softmax_cross_entropy_fwd(logits, targets):
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return lse - picked, (logits, lse, targets)


def _softmax_cross_entropy_bwd(res, ct):
    logits, lse, targets = res
    onehot = jnp.arange(logits.shape[-1]) == targets[..., None]
    dlogits = (jnp.exp(logits - lse[..., None]) - onehot) * ct[..., None]
    return dlogits.astype(logits.dtype), None


softmax_cross_entropy.defvjp(_softmax_cross_entropy_fwd, _softmax_cross_entropy_bwd)
