"""Window-local causal softmax attention: the XLA path, a cached single-query step, dispatch.

The caller passes exactly one window; every query attends causally to the keys of that window only
(optionally only the last ``sliding_window`` of them). Softmax statistics are float32 whatever the input dtype.
Grouped heads: query head h reads key/value head h // (H / Hkv).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import _checks

BACKENDS = ("auto", "xla", "pallas")


def _check_inputs(q, k, v, sliding_window):
    _checks.require_rank("q", q, 4, "[B, T, H, D]")
    _checks.require_rank("k", k, 4, "[B, T, Hkv, D]")
    _checks.require_rank("v", v, 4, "[B, T, Hkv, D]")
    for name, x in (("q", q), ("k", k), ("v", v)):
        _checks.require_float(name, x)
    B, T, H, D = q.shape
    if k.shape[:2] != (B, T) or k.shape[3] != D:
        raise ValueError(f"k must have shape [B={B}, T={T}, Hkv, D={D}] matching q, got {tuple(k.shape)}")
    _checks.require_shape("v", v, k.shape, "(same as k)")
    _checks.require_divisible("q's head count H", H, "k's head count Hkv", k.shape[2])
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"sliding_window must be None or an int >= 1, got {sliding_window!r}")


def attention_mask(num_queries: int, num_keys: int, sliding_window: int | None, query_offset=0):
    """bool [Tq, Tk]: query i (at position query_offset + i) sees key j iff j <= pos and pos - j < window."""
    pos = query_offset + jnp.arange(num_queries)[:, None]
    key = jnp.arange(num_keys)[None, :]
    mask = key <= pos
    if sliding_window is not None:
        mask &= pos - key < sliding_window
    return mask


def _softmax_attention(q, k, v, mask, scale):
    """q [B,Tq,H,D], k/v [B,Tk,Hkv,D], mask broadcastable to [B,1,1,Tq,Tk] -> [B,Tq,H,D] in q's dtype."""
    B, Tq, H, D = q.shape
    Hkv = k.shape[2]
    qg = q.reshape(B, Tq, Hkv, H // Hkv, D)
    s = jnp.einsum("bqgrd,bkgd->bgrqk", qg, k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bgrqk,bkgd->bqgrd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(B, Tq, H, D).astype(q.dtype)


def xla_window_attention(q, k, v, *, scale=None, sliding_window=None):
    _check_inputs(q, k, v, sliding_window)
    T, D = q.shape[1], q.shape[3]
    scale = D**-0.5 if scale is None else scale
    return _softmax_attention(q, k, v, attention_mask(T, T, sliding_window), scale)


def cached_attention_step(q, k_cache, v_cache, position, *, scale=None, sliding_window=None):
    """One query per sequence against a window-local KV cache (streaming wake).

    q [B, H, D]; k_cache, v_cache [B, L, Hkv, D] whose slots 0..position are filled (slot ``position`` holds
    the current token); position: int32 scalar. Returns [B, H, D]. The cost is that of the fixed cache size L,
    whatever the stream position: that is what keeps wake latency flat.
    """
    L, D = k_cache.shape[1], q.shape[-1]
    scale = D**-0.5 if scale is None else scale
    mask = attention_mask(1, L, sliding_window, query_offset=position)
    return _softmax_attention(q[:, None], k_cache, v_cache, mask, scale)[:, 0]


def default_backend(platform: str | None = None) -> str:
    """Pallas on GPU and TPU, the XLA path elsewhere (CPU: Pallas would only run in interpret mode)."""
    platform = platform or jax.default_backend()
    return "pallas" if platform in ("gpu", "cuda", "rocm", "tpu") else "xla"


def window_attention(q, k, v, *, scale=None, sliding_window=None, backend="auto"):
    """Causal softmax attention within one window.

    q [B, T, H, D]; k, v [B, T, Hkv, D] (H % Hkv == 0); scale defaults to D**-0.5; sliding_window=w limits
    each query to the last w keys (itself included). Returns [B, T, H, D] in q's dtype.
    """
    _checks.require_choice("backend", backend, BACKENDS)
    if backend == "auto":
        backend = default_backend()
    if backend == "xla":
        return xla_window_attention(q, k, v, scale=scale, sliding_window=sliding_window)
    from . import attention_pallas

    return attention_pallas.window_attention_pallas(q, k, v, scale=scale, sliding_window=sliding_window)
