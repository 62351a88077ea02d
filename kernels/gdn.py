"""Gated delta rule (Gated DeltaNet fast weights): the token recurrence, the chunked XLA algorithm, dispatch.

Per value head h with fast weight S of shape [Dk, Dv] (float32):
    S <- exp(g_t) S
    S <- S + k_t (beta_t (v_t - S^T k_t))^T          (use_delta=True; use_delta=False drops "- S^T k_t")
    o_t = S^T (scale q_t)
Query/key head i serves value heads i*Hv/Hk ... (i+1)*Hv/Hk - 1. Conventions match flash-linear-attention's
``chunk_gated_delta_rule`` so results can be compared.

Backends: "recurrent" (token-by-token ``lax.scan``: the oracle), "chunked" (the chunked algorithm below, pure
jnp with a ``lax.scan`` over chunks), "xla" (the recurrence for values, the chunked algorithm under
differentiation: the fastest on CPU either way), "pallas" (GPU/TPU kernels, see ``gdn_pallas.py``), "auto"
(Pallas on GPU/TPU, "xla" elsewhere).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from . import _checks

BACKENDS = ("auto", "xla", "recurrent", "chunked", "pallas")
_LAYOUT = "[B, T, H, D]"


# --------------------------------------------------------------------------------------------------------------
# Shared helpers


def _expand_heads(x, num_heads: int):
    """[..., Hk, D] -> [..., Hv, D]: key head i serves value heads i*r ... (i+1)*r - 1."""
    return jnp.repeat(x, num_heads // x.shape[-2], axis=-2)


def _check_inputs(q, k, v, g, beta, initial_state):
    _checks.require_rank("q", q, 4, "[B, T, Hk, Dk]")
    _checks.require_rank("k", k, 4, "[B, T, Hk, Dk]")
    _checks.require_rank("v", v, 4, "[B, T, Hv, Dv]")
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        _checks.require_float(name, x)
    B, T, Hk, Dk = q.shape
    _checks.require_shape("k", k, q.shape, "(same as q)")
    if v.shape[:2] != (B, T):
        raise ValueError(f"v must have shape [B={B}, T={T}, Hv, Dv] matching q, got {tuple(v.shape)}")
    Hv, Dv = v.shape[2], v.shape[3]
    if T < 1:
        raise ValueError(f"q must hold at least one token (T >= 1), got T={T}")
    _checks.require_divisible("v's head count Hv", Hv, "q's head count Hk", Hk)
    _checks.require_shape("g", g, (B, T, Hv), "[B, T, Hv]")
    _checks.require_shape("beta", beta, (B, T, Hv), "[B, T, Hv]")
    if initial_state is not None:
        _checks.require_shape("initial_state", initial_state, (B, Hv, Dk, Dv), "[B, Hv, Dk, Dv]")
        _checks.require_float("initial_state", initial_state)
    return B, T, Hk, Hv, Dk, Dv


def _prepare(q, k, v, g, beta, initial_state, scale):
    """Compute dtype (float32, or float64 when given float64: the tests' oracle), heads expanded to Hv,
    q scaled, state materialised."""
    B, T, Hk, Hv, Dk, Dv = _check_inputs(q, k, v, g, beta, initial_state)
    scale = Dk**-0.5 if scale is None else scale
    ct = jnp.result_type(jnp.float32, q.dtype)
    q = _expand_heads(q.astype(ct), Hv) * scale
    k = _expand_heads(k.astype(ct), Hv)
    state = jnp.zeros((B, Hv, Dk, Dv), ct) if initial_state is None else initial_state.astype(ct)
    return q, k, v.astype(ct), g.astype(ct), beta.astype(ct), state


# --------------------------------------------------------------------------------------------------------------
# Reference: the token recurrence


def _token_update(state, q, k, v, g, beta, use_delta: bool):
    """One token for every (batch, head). state [B,H,Dk,Dv]; q,k [B,H,Dk] (q scaled); v [B,H,Dv]; g,beta [B,H]."""
    state = jnp.exp(g)[..., None, None] * state
    if use_delta:
        v = v - jnp.einsum("bhkv,bhk->bhv", state, k)
    state = state + k[..., :, None] * (beta[..., None] * v)[..., None, :]
    return jnp.einsum("bhkv,bhk->bhv", state, q), state


@functools.partial(jax.jit, static_argnames=("scale", "use_delta"))
def gated_delta_rule_step(q, k, v, g, beta, state, *, scale=None, use_delta=True):
    """One decoding step. q, k [B, Hk, Dk]; v [B, Hv, Dv]; g, beta [B, Hv]; state [B, Hv, Dk, Dv] (float32).
    Returns o [B, Hv, Dv] in q's dtype and the new float32 state."""
    q4, k4, v4, g3, b3 = (x[:, None] for x in (q, k, v, g, beta))
    qf, kf, vf, gf, bf, state = _prepare(q4, k4, v4, g3, b3, state, scale)
    o, state = _token_update(state, qf[:, 0], kf[:, 0], vf[:, 0], gf[:, 0], bf[:, 0], use_delta)
    return o.astype(q.dtype), state


@functools.partial(jax.jit, static_argnames=("scale", "use_delta"))
def recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=None, *, scale=None, use_delta=True):
    """Token-by-token ``lax.scan``: slow, simple, the oracle for every other backend."""
    qf, kf, vf, gf, bf, state = _prepare(q, k, v, g, beta, initial_state, scale)

    def body(s, xs):
        o, s = _token_update(s, *xs, use_delta)
        return s, o

    time_major = [jnp.moveaxis(x, 1, 0) for x in (qf, kf, vf, gf, bf)]
    state, o = jax.lax.scan(body, state, time_major)
    return jnp.moveaxis(o, 0, 1).astype(q.dtype), state


# --------------------------------------------------------------------------------------------------------------
# Chunked algorithm (XLA)

def unit_lower_inverse(a):
    """(I + a)^-1 for strictly lower-triangular a [..., C, C], by recursive doubling of diagonal blocks.

    Blocks of size s whose inverses are known pair up into blocks of size 2s:
    [[A, 0], [M, B]]^-1 = [[A^-1, 0], [-B^-1 M A^-1, B^-1]]; starting from 1x1 blocks (all 1) this takes
    log2(C) levels of batched matmuls and is exactly block forward substitution (no series truncation). No
    ``triangular_solve`` (Pallas cannot lower it and its gradient hung XLA:CPU under jit(grad)) and no row loop
    (which dominated the model's step time at small sizes).
    """
    C = a.shape[-1]
    n = 1 << max(C - 1, 0).bit_length()  # pad to a power of two: the padding block is the identity
    if n != C:
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, n - C), (0, n - C)])
    lead = a.shape[:-2]
    diag = jnp.ones(lead + (n, 1, 1), a.dtype)  # inverses of the diagonal blocks, [..., n/s, s, s]
    size = 1
    while size < n:
        blocks = a.reshape(lead + (n // size, size, n // size, size))
        pairs = jnp.arange(0, n // size, 2)
        coupling = blocks[..., pairs + 1, :, pairs, :]  # [n/2s, ..., s, s]: block row 2j+1, column 2j
        coupling = jnp.moveaxis(coupling, 0, -3)
        upper, lower = diag[..., 0::2, :, :], diag[..., 1::2, :, :]
        off = -(lower @ coupling @ upper)
        zeros = jnp.zeros_like(off)
        diag = jnp.concatenate([jnp.concatenate([upper, zeros], -1), jnp.concatenate([off, lower], -1)], -2)
        size *= 2
    return diag[..., 0, :C, :C]


def _chunk_size_for(T: int, chunk_size: int) -> int:
    """Short sequences use a smaller chunk (a power of two >= 16) instead of padding to the full chunk."""
    return min(chunk_size, max(16, 1 << (T - 1).bit_length()))


@jax.custom_vjp
def pairwise_log_decay(g):
    """g [..., C] -> [..., C, C] with entry (i, j) = sum_{j < s <= i} g_s = G_i - G_j for i > j, else 0.

    The custom gradient sums each g_t's share directly (dg_t = sum_{i >= t > j} ct_ij). Autodiff through
    ``G_i - G_j`` would instead add and subtract large, cancelling terms: under strong decay (g ~ -10) that
    cost dg three orders of magnitude of float32 accuracy.
    """
    C = g.shape[-1]
    G = jnp.cumsum(g, axis=-1)
    return jnp.where(jnp.tril(jnp.ones((C, C), bool), -1), G[..., :, None] - G[..., None, :], 0.0)


def _pairwise_log_decay_fwd(g):
    return pairwise_log_decay(g), None


def _pairwise_log_decay_bwd(_, ct):
    C = ct.shape[-1]
    strict = jnp.tril(jnp.ones((C, C), bool), -1)
    ct = jnp.where(strict, ct, 0.0)
    below = jnp.flip(jnp.cumsum(jnp.flip(ct, -2), axis=-2), -2)  # below[t, j] = sum_{i >= t} ct[i, j]
    return (jnp.sum(jnp.where(strict, below, 0.0), axis=-1),)


pairwise_log_decay.defvjp(_pairwise_log_decay_fwd, _pairwise_log_decay_bwd)


def chunk_precompute(q, k, v, g, beta, use_delta: bool):
    """Everything that does not depend on the carried state, for all chunks at once.

    Inputs are [..., C, D] (q already scaled), g and beta [..., C]. Returns (qg, kdec, gamma_last, w, u, p):
    qg = q*exp(G) [...,C,Dk]; kdec = k*exp(G_C - G) [...,C,Dk]; gamma_last = exp(G_C) [...]; w [...,C,Dk] and
    u [...,C,Dv] with v_new = u - w S; p = tril(q k^T * D) [...,C,C], where G = cumsum(g) within the chunk and
    D_ij = exp(G_i - G_j) for i >= j.
    """
    C = g.shape[-1]
    G = jnp.cumsum(g, axis=-1)
    strict = jnp.tril(jnp.ones((C, C), bool), -1)
    # Mask before exp: the upper triangle is never exponentiated; the diagonal is exactly 1.
    decay = jnp.where(strict, jnp.exp(jnp.where(strict, pairwise_log_decay(g), 0.0)), 0.0) + jnp.eye(C, dtype=g.dtype)
    gamma = jnp.exp(G)
    p = jnp.einsum("...id,...jd->...ij", q, k) * decay
    bv = beta[..., None] * v
    if use_delta:
        a = jnp.where(strict, beta[..., :, None] * jnp.einsum("...id,...jd->...ij", k, k) * decay, 0.0)
        t = unit_lower_inverse(a)
        w = t @ ((beta * gamma)[..., None] * k)
        u = t @ bv
    else:
        w = jnp.zeros_like(k)
        u = bv
    # G_C - G_i = sum_{s > i} g_s, summed directly (an exclusive suffix sum) for the same reason as above.
    suffix = jnp.flip(jnp.cumsum(jnp.flip(g, -1), axis=-1), -1)
    suffix = jnp.concatenate([suffix[..., 1:], jnp.zeros_like(suffix[..., :1])], axis=-1)
    kdec = k * jnp.exp(suffix)[..., None]
    return q * gamma[..., None], kdec, gamma[..., -1], w, u, p


def chunk_step(state, qg, kdec, gamma_last, w, u, p):
    """Advance one chunk: state [...,Dk,Dv] at the chunk start -> (outputs [...,C,Dv], state at its end)."""
    v_new = u - w @ state
    o = qg @ state + p @ v_new
    state = gamma_last[..., None, None] * state + jnp.swapaxes(kdec, -1, -2) @ v_new
    return o, state


def _check_chunk_size(chunk_size) -> None:
    if not isinstance(chunk_size, int) or chunk_size < 16 or chunk_size % 16:
        raise ValueError(f"chunk_size must be a positive multiple of 16, got {chunk_size!r}")


@functools.partial(jax.jit, static_argnames=("scale", "use_delta", "chunk_size"))
def chunked_gated_delta_rule(q, k, v, g, beta, initial_state=None, *, scale=None, use_delta=True,
                             chunk_size=64):
    """The chunked algorithm in plain jnp; sequential only across chunks. Any T (padded internally)."""
    _check_chunk_size(chunk_size)
    qf, kf, vf, gf, bf, state = _prepare(q, k, v, g, beta, initial_state, scale)
    B, T, H, Dv = vf.shape
    C = _chunk_size_for(T, chunk_size)
    n = -(-T // C)
    pad = n * C - T

    def chunks(x):  # [B, T, H, ...] -> [n, B, H, C, ...]; padding has g = beta = k = 0: the state is untouched
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape((B, n, C) + x.shape[2:])
        x = jnp.moveaxis(x, 3, 2)  # [B, n, H, C, ...]
        return jnp.moveaxis(x, 1, 0)

    pre = chunk_precompute(*(chunks(x) for x in (qf, kf, vf, gf, bf)), use_delta)

    def body(s, xs):
        o, s = chunk_step(s, *xs)
        return s, o

    state, o = jax.lax.scan(body, state, pre)  # o [n, B, H, C, Dv]
    o = jnp.moveaxis(o, 0, 1).transpose(0, 1, 3, 2, 4).reshape(B, n * C, H, Dv)[:, :T]
    return o.astype(q.dtype), state


# --------------------------------------------------------------------------------------------------------------
# Dispatch


def default_backend(platform: str | None = None) -> str:
    """Pallas on GPU and TPU; elsewhere "xla": the recurrence forward with the chunked algorithm's gradient."""
    platform = platform or jax.default_backend()
    return "pallas" if platform in ("gpu", "cuda", "rocm", "tpu") else "xla"


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _xla_gated_delta_rule(q, k, v, g, beta, initial_state, scale, use_delta, chunk_size):
    """On CPU the token recurrence is the faster forward (the chunked algorithm does ~4x its flops: measured
    0.5x its speed at B=1, T=4096), while the chunked gradient is far faster (measured 7x). This takes both: the
    recurrence when only values are needed, the chunked algorithm (forward and backward) under differentiation."""
    return recurrent_gated_delta_rule(q, k, v, g, beta, initial_state, scale=scale, use_delta=use_delta)


def _xla_fwd(q, k, v, g, beta, initial_state, scale, use_delta, chunk_size):
    return jax.vjp(lambda *a: chunked_gated_delta_rule(*a, scale=scale, use_delta=use_delta, chunk_size=chunk_size),
                   q, k, v, g, beta, initial_state)


def _xla_bwd(scale, use_delta, chunk_size, vjp, cotangents):
    return vjp(cotangents)


_xla_gated_delta_rule.defvjp(_xla_fwd, _xla_bwd)


def gated_delta_rule(q, k, v, g, beta, initial_state=None, *, scale=None, use_delta=True, chunk_size=64,
                     backend="auto"):
    """Gated delta rule over a sequence.

    q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv] (Hv % Hk == 0); g (log decay, <= 0) and beta [B, T, Hv];
    initial_state [B, Hv, Dk, Dv] or None (zeros). scale defaults to Dk**-0.5 and multiplies q.
    Returns (o [B, T, Hv, Dv] in q's dtype, final_state [B, Hv, Dk, Dv] float32).
    """
    _checks.require_choice("backend", backend, BACKENDS)
    if backend == "auto":
        backend = default_backend()
    if backend == "recurrent":
        return recurrent_gated_delta_rule(q, k, v, g, beta, initial_state, scale=scale, use_delta=use_delta)
    if backend == "xla":
        _check_inputs(q, k, v, g, beta, initial_state)
        _check_chunk_size(chunk_size)
        if initial_state is None:  # custom_vjp needs an array to differentiate
            initial_state = jnp.zeros((q.shape[0], v.shape[2], q.shape[3], v.shape[3]), jnp.float32)
        return _xla_gated_delta_rule(q, k, v, g, beta, initial_state, scale, use_delta, chunk_size)
    if backend == "chunked":
        return chunked_gated_delta_rule(q, k, v, g, beta, initial_state, scale=scale, use_delta=use_delta,
                                        chunk_size=chunk_size)
    from . import gdn_pallas

    return gdn_pallas.gated_delta_rule_pallas(q, k, v, g, beta, initial_state, scale=scale, use_delta=use_delta,
                                              chunk_size=chunk_size)
