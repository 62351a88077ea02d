"""The chunked gated delta rule: chunk-parallel stages in batched XLA around one sequential state scan.

Per head, chunk of C tokens (G = cumulative sum of g inside the chunk, q scaled by ``scale``):
    gamma_i = exp(G_i),  D_ij = exp(G_i - G_j) [i >= j],  Kdec = diag(exp(G_C - G)) K
    A = strict_lower(diag(beta) K K^T * D),  T = (I + A)^-1   (``unit_lower_inverse``)
    W = T diag(beta gamma) K,  U = T diag(beta) V             (use_delta=False: W = 0, U = diag(beta) V)
    -- sequential over chunks (``gdn_scan.state_scan``): states[c] = S;  V_new = U - W S;
       S <- exp(G_C) S + Kdec^T V_new
    O = diag(gamma) Q states[c] + tril(Q K^T * D) V_new
Everything except the scan runs over all (chunk, batch, head) at once; the backward of those stages is XLA
autodiff (also chunk-parallel), the scan's backward a reverse scan (``gdn_scan``). Matmul operands follow
``_matmul.operand_dtype`` (bf16 in, bf16 operands with float32 accumulation; float32 in, true float32); the
decays, (I + A)^-1 and the carried state are float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from . import _checks, _matmul, gdn_reference
from .gdn_scan import ScanConfig, state_scan

HIGHEST = lax.Precision.HIGHEST


@jax.custom_vjp
def unit_lower_inverse(a):
    """(I + a)^-1 for strictly lower-triangular a [..., C, C], by recursive doubling of diagonal blocks.

    Blocks of size s whose inverses are known pair up into blocks of size 2s:
    [[A, 0], [M, B]]^-1 = [[A^-1, 0], [-B^-1 M A^-1, B^-1]]. Starting from 1x1 blocks, the levels up to 16 are
    the substitution of the 16x16 diagonal blocks, the later ones merge them with small matmuls: exactly block
    forward substitution (no series truncation), log2(C) levels of batched matmuls in full precision. No
    ``triangular_solve`` (Pallas cannot lower it and its gradient hung XLA:CPU under jit(grad)).

    Gradient (custom): with T = (I + a)^-1, da = -T^T dT T^T on the strictly lower triangle (the only entries
    read): two matmuls, where autodiff through the doubling levels' slices and concatenations cost 4x the
    forward (measured on CPU at C = 64).
    """
    return _unit_lower_inverse(a)


def _unit_lower_inverse_fwd(a):
    t = _unit_lower_inverse(a)
    return t, t


def _unit_lower_inverse_bwd(t, dt):
    C = t.shape[-1]
    tt = jnp.swapaxes(t, -1, -2)
    da = -jnp.matmul(jnp.matmul(tt, dt, precision=HIGHEST), tt, precision=HIGHEST)
    return (jnp.where(jnp.tril(jnp.ones((C, C), bool), -1), da, 0.0).astype(t.dtype),)


unit_lower_inverse.defvjp(_unit_lower_inverse_fwd, _unit_lower_inverse_bwd)


def _unit_lower_inverse(a):
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
        off = -jnp.matmul(jnp.matmul(lower, coupling, precision=HIGHEST), upper, precision=HIGHEST)
        zeros = jnp.zeros_like(off)
        diag = jnp.concatenate([jnp.concatenate([upper, zeros], -1), jnp.concatenate([off, lower], -1)], -2)
        size *= 2
    return diag[..., 0, :C, :C]


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


def chunk_stages(q, k, v, g, beta, *, scale: float, use_delta: bool, op):
    """The chunk-parallel stages before the scan. q, k [..., C, Dk] and v [..., C, Dv] (any float dtype; q NOT
    yet scaled), g and beta [..., C] in the compute dtype. Returns (qg [..., C, Dk] = scale q gamma,
    p [..., C, C] = tril(scale q k^T * D), w [..., C, Dk] or None, u [..., C, Dv], kdec [..., C, Dk]);
    w, u, kdec in the operand dtype ``op``."""
    ct = g.dtype
    C = g.shape[-1]
    strict = jnp.tril(jnp.ones((C, C), bool), -1)
    # Mask before exp: the upper triangle is never exponentiated; the diagonal is exactly 1.
    decay = jnp.where(strict, jnp.exp(jnp.where(strict, pairwise_log_decay(g), 0.0)), 0.0) + jnp.eye(C, dtype=ct)
    gamma = jnp.exp(jnp.cumsum(g, axis=-1))
    # G_C - G_i = sum_{s > i} g_s, summed directly (an exclusive suffix sum) for the same reason as above.
    suffix = jnp.flip(jnp.cumsum(jnp.flip(g, -1), axis=-1), -1)
    suffix = jnp.concatenate([suffix[..., 1:], jnp.zeros_like(suffix[..., :1])], axis=-1)
    kf = k.astype(ct)
    kdec = (kf * jnp.exp(suffix)[..., None]).astype(op)
    p = _matmul.mm("...id,...jd->...ij", q, k, op).astype(ct) * (scale * decay)
    qg = q.astype(ct) * (scale * gamma)[..., None]
    bv = beta[..., None] * v.astype(ct)
    if not use_delta:
        return qg, p, None, bv.astype(op), kdec
    kk = _matmul.mm("...id,...jd->...ij", k, k, op).astype(ct)
    t = unit_lower_inverse(jnp.where(strict, beta[..., :, None] * kk * decay, 0.0))
    w = _matmul.mm("...ij,...jd->...id", t, (beta * gamma)[..., None] * kf, op).astype(op)
    u = _matmul.mm("...ij,...jd->...id", t, bv, op).astype(op)
    return qg, p, w, u, kdec


def chunk_output(qg, p, states, v_new, op):
    """O = qg states + p v_new, chunk-parallel: [..., C, Dv] in the accumulator dtype."""
    return _matmul.mm("...ck,...kv->...cv", qg, states, op) + _matmul.mm("...ij,...jv->...iv", p, v_new, op)


def chunk_size_for(T: int, chunk_size: int) -> int:
    """Short sequences use a smaller chunk (a power of two >= 16) instead of padding to the full chunk."""
    return min(chunk_size, max(16, 1 << (T - 1).bit_length()))


def _to_chunks(x, n: int, C: int, chunk_major: bool):
    """[B, T, H, ...] -> [n, B, H, C, ...] (chunk-major) or [B, H, n, C, ...] (head-major); zero padding."""
    B, T = x.shape[:2]
    x = jnp.pad(x, [(0, 0), (0, n * C - T)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((B, n, C) + x.shape[2:])  # [B, n, C, H, ...]
    rest = tuple(range(4, x.ndim))
    return jnp.transpose(x, ((1, 0, 3, 2) if chunk_major else (0, 3, 1, 2)) + rest)


def _from_chunks(o, T: int, chunk_major: bool):
    perm = (1, 0, 3, 2, 4) if chunk_major else (0, 2, 3, 1, 4)
    o = jnp.transpose(o, perm)  # [B, n, C, H, Dv]
    B, n, C, H, Dv = o.shape
    return o.reshape(B, n * C, H, Dv)[:, :T]


def chunked_gated_delta_rule(q, k, v, g, beta, initial_state=None, *, scale=None, use_delta=True, chunk_size=64,
                             scan: ScanConfig | None = None):
    """The chunked algorithm; contract of ``gdn.gated_delta_rule``. Any T (padded internally: padded tokens
    have g = beta = k = 0 and leave the state untouched). ``scan`` picks the state-scan implementation
    (default: ``lax.scan``)."""
    _checks.check_chunk_size(chunk_size)
    _checks.check_gdn_inputs(q, k, v, g, beta, initial_state)
    scan = ScanConfig(use_delta=bool(use_delta)) if scan is None else scan
    if scan.use_delta != bool(use_delta):
        raise ValueError(f"scan.use_delta ({scan.use_delta}) must match use_delta ({use_delta})")
    return _chunked(q, k, v, g, beta, initial_state, _checks.python_scale(scale, q.shape[-1]), chunk_size, scan)


@functools.partial(jax.jit, static_argnums=(6, 7, 8))
def _chunked(q, k, v, g, beta, initial_state, scale: float, chunk_size: int, scan: ScanConfig):
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[2], v.shape[3]
    ct = gdn_reference.compute_dtype(q.dtype)
    op = _matmul.operand_dtype(jnp.result_type(q.dtype, k.dtype, v.dtype))
    C = chunk_size_for(T, chunk_size)
    n = -(-T // C)
    chunk_major = scan.chunk_axis == 0
    chunks = functools.partial(_to_chunks, n=n, C=C, chunk_major=chunk_major)
    qc = chunks(gdn_reference.expand_heads(q, Hv))
    kc = chunks(gdn_reference.expand_heads(k, Hv))
    qg, p, w, u, kdec = chunk_stages(qc, kc, chunks(v), chunks(g.astype(ct)), chunks(beta.astype(ct)),
                                     scale=scale, use_delta=scan.use_delta, op=op)
    s0 = jnp.zeros((B, Hv, Dk, Dv), ct) if initial_state is None else initial_state.astype(ct)
    states, v_new, sT = state_scan(scan, w, u, kdec, chunks(g.astype(ct)), s0)
    o = chunk_output(qg, p, states, v_new, op)
    return _from_chunks(o, T, chunk_major).astype(q.dtype), sT
