"""Window-local causal attention: the public entry points and backend dispatch.

Implementations: ``attention_xla.py`` (XLA reference, cached one-query step, the cuDNN call; the one path that
also takes the previous window's keys, sliding eviction's context), ``attention_pallas.py`` (flash kernels).
Backend names and how ``"auto"`` is resolved: ``backends.py``.
"""

from __future__ import annotations

from . import _checks, backends
from .attention_pallas import BACKWARDS, window_attention_pallas
from .attention_xla import attention_mask, cached_attention_step, cudnn_window_attention, xla_window_attention

BACKENDS = backends.ATTENTION_BACKENDS

__all__ = ["BACKENDS", "BACKWARDS", "window_attention", "cached_attention_step", "xla_window_attention",
           "cudnn_window_attention", "window_attention_pallas", "attention_mask", "default_backend"]


def default_backend(platform: str | None = None, *, dtype="bfloat16", head_dim: int = 128) -> str:
    """What ``backend="auto"`` runs on ``platform`` for inputs of ``dtype`` and ``head_dim``."""
    return backends.resolve_attention_backend("auto", dtype=dtype, head_dim=head_dim, platform=platform)


def window_attention(q, k, v, *, scale=None, sliding_window=None, backend="auto", backward="pallas"):
    """Causal softmax attention within one window.

    q [B, T, H, D]; k, v [B, T, Hkv, D] (H % Hkv == 0); scale defaults to D**-0.5; sliding_window=w limits
    each query to the last w keys (itself included). Returns [B, T, H, D] in q's dtype.
    backend: one of ``BACKENDS`` (see ``backends.py``). backward: the Pallas path's gradient, one of
    ``attention_pallas.BACKWARDS`` ("pallas" kernels, or "xla": autodiff of the XLA attention); the other
    backends' gradients are their own.
    """
    _checks.check_attention_inputs(q, k, v, sliding_window)
    _checks.require_choice("backward", backward, BACKWARDS)
    chosen = backends.resolve_attention_backend(backend, dtype=q.dtype, head_dim=q.shape[-1])
    if chosen == "cudnn":
        try:
            return cudnn_window_attention(q, k, v, scale=scale, sliding_window=sliding_window)
        except (NotImplementedError, RuntimeError) as e:  # cuDNN refused this call at trace time
            if backend != "auto":
                raise
            backends.warn_once(f"window_attention(backend='auto'): cuDNN refused the call "
                               f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); using the fallback")
            chosen = backends.attention_fallback()
    if chosen == "xla":
        return xla_window_attention(q, k, v, scale=scale, sliding_window=sliding_window)
    return window_attention_pallas(q, k, v, scale=scale, sliding_window=sliding_window, backward=backward)
