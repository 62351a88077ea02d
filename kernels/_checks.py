"""Argument checks shared by the kernel entry points: fail early with a message naming the argument."""

from __future__ import annotations

import jax.numpy as jnp


def require_rank(name: str, x, rank: int, layout: str) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"{name} must be an array {layout}, got {type(x).__name__}")
    if x.ndim != rank:
        raise ValueError(f"{name} must have rank {rank} {layout}, got shape {tuple(x.shape)}")


def require_float(name: str, x) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")


def require_shape(name: str, x, expected: tuple, layout: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} {layout}, got {tuple(x.shape)}")


def require_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def require_divisible(name: str, total: int, part_name: str, part: int) -> None:
    if part < 1 or total % part:
        raise ValueError(f"{name} ({total}) must be a multiple of {part_name} ({part})")


def check_chunk_size(chunk_size) -> None:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 16 or chunk_size % 16:
        raise ValueError(f"chunk_size must be a positive multiple of 16, got {chunk_size!r}")


def check_gdn_inputs(q, k, v, g, beta, initial_state):
    """Gated delta rule inputs: q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; g, beta [B, T, Hv]; initial_state
    [B, Hv, Dk, Dv] or None. Returns (B, T, Hk, Hv, Dk, Dv)."""
    require_rank("q", q, 4, "[B, T, Hk, Dk]")
    require_rank("k", k, 4, "[B, T, Hk, Dk]")
    require_rank("v", v, 4, "[B, T, Hv, Dv]")
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        require_float(name, x)
    B, T, Hk, Dk = q.shape
    require_shape("k", k, q.shape, "(same as q)")
    if v.shape[:2] != (B, T):
        raise ValueError(f"v must have shape [B={B}, T={T}, Hv, Dv] matching q, got {tuple(v.shape)}")
    Hv, Dv = v.shape[2], v.shape[3]
    if T < 1:
        raise ValueError(f"q must hold at least one token (T >= 1), got T={T}")
    require_divisible("v's head count Hv", Hv, "q's head count Hk", Hk)
    require_shape("g", g, (B, T, Hv), "[B, T, Hv]")
    require_shape("beta", beta, (B, T, Hv), "[B, T, Hv]")
    if initial_state is not None:
        require_shape("initial_state", initial_state, (B, Hv, Dk, Dv), "[B, Hv, Dk, Dv]")
        require_float("initial_state", initial_state)
    return B, T, Hk, Hv, Dk, Dv


def check_attention_inputs(q, k, v, sliding_window) -> None:
    """Window attention inputs: q [B, T, H, D]; k, v [B, T, Hkv, D] with H % Hkv == 0; sliding_window None or
    an int >= 1."""
    require_rank("q", q, 4, "[B, T, H, D]")
    require_rank("k", k, 4, "[B, T, Hkv, D]")
    require_rank("v", v, 4, "[B, T, Hkv, D]")
    for name, x in (("q", q), ("k", k), ("v", v)):
        require_float(name, x)
    B, T, H, D = q.shape
    if k.shape[:2] != (B, T) or k.shape[3] != D:
        raise ValueError(f"k must have shape [B={B}, T={T}, Hkv, D={D}] matching q, got {tuple(k.shape)}")
    require_shape("v", v, k.shape, "(same as k)")
    require_divisible("q's head count H", H, "k's head count Hkv", k.shape[2])
    if sliding_window is not None and (not isinstance(sliding_window, int) or isinstance(sliding_window, bool)
                                       or sliding_window < 1):
        raise ValueError(f"sliding_window must be None or an int >= 1, got {sliding_window!r}")


def python_scale(scale, head_dim: int) -> float:
    """The softmax / query scale as a Python float (it is static: baked into kernels and jit caches)."""
    try:
        return float(head_dim**-0.5 if scale is None else scale)
    except TypeError as e:
        raise ValueError(f"scale must be a Python number or None, got {scale!r}") from e
