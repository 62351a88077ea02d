"""The pieces of a block, shared by the window path (``model.py``) and the one-token path (``stream.py``).

Every function is pure: (parameter dict, activations) -> activations. Weights are stored float32 and cast to
the activation dtype at use; gates, norms' statistics and the fast weights stay float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

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
    return x @ w.astype(x.dtype)


def rms_norm(x, weight, eps):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * weight).astype(x.dtype)


def mlp(p, x):
    """SwiGLU: [..., d] -> [..., d]."""
    return dense(jax.nn.silu(dense(x, p["w_gate"])) * dense(x, p["w_up"]), p["w_down"])


# ---------------------------------------------------------------------------------------------------------------
# Attention


def rope(x, positions, theta):
    """Rotary embedding. x [..., T, H, D] (or [..., H, D] with scalar positions); positions [T] or scalar."""
    half = x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = jnp.asarray(positions, jnp.float32)[..., None] * freqs  # [T, half] or [half]
    angles = angles[..., None, :]  # broadcast over heads
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


def attention_qkv(p, x, positions, cfg: ModelConfig):
    """x [..., d] -> q [..., H, D], k and v [..., Hkv, D], RoPE applied at ``positions``."""
    lead = x.shape[:-1]
    q = dense(x, p["wq"]).reshape(lead + (cfg.attn_heads, cfg.attn_head_dim))
    k = dense(x, p["wk"]).reshape(lead + (cfg.attn_kv_heads, cfg.attn_head_dim))
    v = dense(x, p["wv"]).reshape(lead + (cfg.attn_kv_heads, cfg.attn_head_dim))
    return rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta), v


def attention_output(p, o):
    return dense(o.reshape(o.shape[:-2] + (-1,)), p["wo"])


def attention_window(p, x, cfg: ModelConfig):
    """Causal attention over one window. x [B, T, d] -> [B, T, d]; positions restart at 0 every window."""
    q, k, v = attention_qkv(p, x, jnp.arange(x.shape[1]), cfg)
    return attention_output(p, _window_attention(q, k, v, cfg))


def attention_token(p, x, cache, position, cfg: ModelConfig):
    """One token. x [B, d]; cache (k, v) each [B, L, Hkv, D]; position int32 scalar in [0, L)."""
    q, k, v = attention_qkv(p, x, position, cfg)
    k_cache = jax.lax.dynamic_update_slice_in_dim(cache[0], k[:, None].astype(cache[0].dtype), position, axis=1)
    v_cache = jax.lax.dynamic_update_slice_in_dim(cache[1], v[:, None].astype(cache[1].dtype), position, axis=1)
    o = cached_attention_step(q, k_cache, v_cache, position)
    return attention_output(p, o), (k_cache, v_cache)


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


def gdn_heads(p, conv_out, x, cfg: ModelConfig):
    """Conv outputs [..., C] and block input x [..., d] -> q, k [..., Hk, Dk]; v [..., Hv, Dv]; g, beta [..., Hv]
    (float32; g = -exp(A_log) softplus(W_a x + dt_bias) <= 0, computed in log space)."""
    lead = conv_out.shape[:-1]
    y = jax.nn.silu(conv_out)
    nq = cfg.gdn_heads * cfg.gdn_key_dim
    q = _l2_normalize(y[..., :nq].reshape(lead + (cfg.gdn_heads, cfg.gdn_key_dim)))
    k = _l2_normalize(y[..., nq:2 * nq].reshape(lead + (cfg.gdn_heads, cfg.gdn_key_dim)))
    v = y[..., 2 * nq:].reshape(lead + (cfg.gdn_value_heads, cfg.gdn_value_dim))
    xf = x.astype(jnp.float32)
    g = -jnp.exp(p["a_log"]) * jax.nn.softplus(xf @ p["w_a"] + p["dt_bias"])
    beta = jax.nn.sigmoid(xf @ p["w_b"])
    return q, k, v, g, beta


def gdn_output(p, o, x, cfg: ModelConfig):
    """o [..., Hv, Dv] -> RMSNorm(o) per head * SiLU(W_gate x) -> W_o: [..., d]."""
    o = rms_norm(o, p["o_norm"], cfg.norm_eps)
    gate = jax.nn.silu(dense(x, p["w_gate"])).reshape(o.shape)
    return dense((o * gate).reshape(o.shape[:-2] + (-1,)), p["wo"])


def gdn_window(p, x, state, cfg: ModelConfig, valid=None):
    """One window. x [B, T, d]; state [B, Hv, Dk, Dv] -> ([B, T, d], new state). ``valid`` [T] bool:
    at False (padding) positions g = beta = 0, so the fast weights are left exactly as they were."""
    conv_out = causal_conv(dense(x, p["w_qkv"]), p["conv"])
    q, k, v, g, beta = gdn_heads(p, conv_out, x, cfg)
    if valid is not None:
        g = jnp.where(valid[:, None], g, 0.0)
        beta = jnp.where(valid[:, None], beta, 0.0)
    o, state = _gated_delta_rule(q, k, v, g, beta, state, cfg)
    return gdn_output(p, o, x, cfg), state


def gdn_token(p, x, state, conv_cache, cfg: ModelConfig):
    """One token. x [B, d]; state [B, Hv, Dk, Dv]; conv_cache [B, K-1, C] (the previous raw projections
    of this window, zeros before its start)."""
    raw = dense(x, p["w_qkv"])
    taps = jnp.concatenate([conv_cache, raw[:, None].astype(conv_cache.dtype)], axis=1)  # [B, K, C]
    conv_out = jnp.sum(taps * p["conv"].astype(taps.dtype), axis=1).astype(x.dtype)
    q, k, v, g, beta = gdn_heads(p, conv_out, x, cfg)
    o, state = gated_delta_rule_step(q, k, v, g, beta, state, use_delta=cfg.ssm_rule == "delta")
    return gdn_output(p, o, x, cfg), state, taps[:, 1:]
