"""The pieces of a block, shared by the window path (``model.py``) and the one-token path (``stream.py``).

Every function is pure: (parameter dict, activations) -> activations. Weights are stored float32 and cast to
the activation dtype at use; gates, norms' statistics and the fast weights stay float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sleepjax.config import ModelConfig
from sleepjax.kernels import cached_attention_step, gated_delta_rule, gated_delta_rule_step, window_attention
from sleepjax.kernels import sharding as kernel_sharding

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


def _window_attention(q, k, v, cfg: ModelConfig):
    sharded = _active_mesh()
    if sharded is None:
        return window_attention(q, k, v, backend=cfg.attn_backend)
    mesh, batch, head = sharded
    return kernel_sharding.sharded_window_attention(mesh, batch_axis=batch, head_axis=head,
                                                    backend=cfg.attn_backend)(q, k, v)


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


def attention_window(p, x, cfg: ModelConfig):
    """Causal attention over one window. x [B, T, d] -> [B, T, d]; positions restart at 0 every window."""
    q, k, v, *gate = attention_projections(p, x, cfg, with_gate=cfg.attn_output_gate)
    positions = jnp.arange(x.shape[1])
    o = _window_attention(_rope(q, positions, cfg), _rope(k, positions, cfg), v, cfg)
    return attention_output(p, o, x, cfg, gate=gate[0] if gate else None)


def _masked_attention(q, k, v, mask):
    """q [B, Tq, H, D], k/v [B, Tk, Hkv, D], mask bool broadcastable to [B, H, Tq, Tk] -> [B, Tq, H, D]."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask).astype(q.dtype)


def sliding_mask(num_queries: int, context_len: int, window: int, has_context, query_offset=0):
    """bool [Tq, Lc + Tq']: query i sits at position Lc + query_offset + i of [context | window] and sees the
    ``window`` positions up to itself; context positions only if ``has_context``."""
    pos = context_len + query_offset + jnp.arange(num_queries)[:, None]
    key = jnp.arange(context_len + window)[None, :]
    return (key <= pos) & (pos - key < window) & ((key >= context_len) | has_context)


def attention_window_sliding(p, x, context, cfg: ModelConfig):
    """Causal attention over one window that also sees the previous window (sliding-window eviction).

    x [B, T, d]; context (k, v, has_context): the previous window's keys (before RoPE) and values [B, L, Hkv, D]
    and a bool scalar (False: there is no previous window). Positions count from the context's start.
    Returns ([B, T, d], (k, v) of this window before RoPE: the next window's context).
    """
    ctx_k, ctx_v, has_context = context
    L, T = ctx_k.shape[1], x.shape[1]
    q, k, v, *gate = attention_projections(p, x, cfg, with_gate=cfg.attn_output_gate)
    keys = jnp.concatenate([ctx_k, k.astype(ctx_k.dtype)], axis=1)
    values = jnp.concatenate([ctx_v, v.astype(ctx_v.dtype)], axis=1)
    q_roped = _rope(q, L + jnp.arange(T), cfg)
    k_roped = _rope(keys, jnp.arange(L + T), cfg)
    mask = sliding_mask(T, L, L, has_context)[:, : L + T]
    o = _masked_attention(q_roped, k_roped, values, mask[None, None])
    return attention_output(p, o, x, cfg, gate=gate[0] if gate else None), (k, v)


def attention_token(p, x, cache, position, cfg: ModelConfig):
    """One token. x [B, d]; cache (k, v) each [B, L, Hkv, D]; position int32 scalar in [0, L)."""
    q, k, v = attention_qkv(p, x, position, cfg)
    k_cache = jax.lax.dynamic_update_slice_in_dim(cache[0], k[:, None].astype(cache[0].dtype), position, axis=1)
    v_cache = jax.lax.dynamic_update_slice_in_dim(cache[1], v[:, None].astype(cache[1].dtype), position, axis=1)
    o = cached_attention_step(q, k_cache, v_cache, position)
    return attention_output(p, o, x, cfg), (k_cache, v_cache)


def attention_token_sliding(p, x, cache, context, position, cfg: ModelConfig):
    """One token under sliding-window eviction. cache (k, v) [B, L, Hkv, D]: this window's keys (before RoPE) and
    values; context (k, v, has_context): the previous window's, as in ``attention_window_sliding``."""
    ctx_k, ctx_v, has_context = context
    L = ctx_k.shape[1]
    q, k, v = attention_projections(p, x, cfg)
    k_cache = jax.lax.dynamic_update_slice_in_dim(cache[0], k[:, None].astype(cache[0].dtype), position, axis=1)
    v_cache = jax.lax.dynamic_update_slice_in_dim(cache[1], v[:, None].astype(cache[1].dtype), position, axis=1)
    keys = _rope(jnp.concatenate([ctx_k, k_cache], axis=1), jnp.arange(2 * L), cfg)
    values = jnp.concatenate([ctx_v, v_cache], axis=1)
    mask = sliding_mask(1, L, L, has_context, query_offset=position)
    o = _masked_attention(_rope(q, L + position, cfg)[:, None], keys, values, mask[None, None])[:, 0]
    return attention_output(p, o, x, cfg), (k_cache, v_cache)


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
    if valid is not None:
        g = jnp.where(valid[:, None], g, 0.0)
        beta = jnp.where(valid[:, None], beta, 0.0)
    o, state = _gated_delta_rule(q, k, v, g, beta, state, cfg)
    return gdn_output(p, o, x, cfg, gate=gate), state


def gdn_token(p, x, state, conv_cache, cfg: ModelConfig):
    """One token. x [B, d]; state [B, Hv, Dk, Dv]; conv_cache [B, K-1, C] (the previous raw projections
    of this window, zeros before its start)."""
    raw = dense(x, p["w_qkv"])
    taps = jnp.concatenate([conv_cache, raw[:, None].astype(conv_cache.dtype)], axis=1)  # [B, K, C]
    conv_out = jnp.sum(taps * p["conv"].astype(taps.dtype), axis=1).astype(x.dtype)
    q, k, v, g, beta = gdn_heads(p, conv_out, x, cfg)
    o, state = gated_delta_rule_step(q, k, v, g, beta, state, use_delta=cfg.ssm_rule == "delta")
    return gdn_output(p, o, x, cfg), state, taps[:, 1:]


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
