"""Per-chunk math of the chunked gated delta rule, in plain jnp, shared by the Pallas GPU and TPU wrappers.

Every function here works on ONE (batch, value head, value tile) and ONE chunk of C tokens, with 2-D float32
arrays only, and uses a deliberately small set of operations so that both Pallas lowerings accept it:

* 2-D ``broadcasted_iota`` masks, ``where``, ``exp``, elementwise arithmetic;
* row reductions with ``keepdims`` ([C, C] -> [C, 1]) and reductions to a [1, 1] array;
* lane broadcasts of [C, 1] columns and [1, 1] scalars;
* 2-D matmuls (``lax.dot_general``, possibly with one operand transposed), all dimensions >= 16.

Not used, on purpose: ``cumsum`` (Mosaic-TPU has none: a lower-triangular-ones matmul does it),
``triangular_solve`` (neither backend lowers it: a masked substitution + block Neumann product does it),
1-D vectors and [1, C] rows (awkward on TPU: per-token scalars g, beta, dg, dbeta travel as [C, 1] columns and a
row-broadcast matrix is built with a matmul instead of a transpose), slicing of values, and array constants
(masks are built from iota inside the kernel).

Shapes: q, k [C, Dk] (q already scaled); v [C, Dv]; g, beta [C, 1]; state S [Dk, Dv] at the chunk start.
C is a power of two >= 16 (16, 32, 64, 128); Dk, Dv powers of two >= 16 (the wrappers pad).

Conventions (per chunk, G = within-chunk inclusive cumulative sum of g):
    gamma_i = exp(G_i),  D_ij = exp(G_i - G_j) [i >= j],  e_i = exp(G_C - G_i),  gl = exp(G_C)
    A = strict_lower(diag(beta) K K^T * D),  T = (I + A)^-1
    W = T diag(beta gamma) K,  U = T diag(beta) V,  V_new = U - W S          (use_delta=False: V_new = diag(beta) V)
    O = diag(gamma) Q S + tril(Q K^T * D) V_new
    S' = gl S + (diag(e) K)^T V_new
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

F32 = jnp.float32
HIGHEST = lax.Precision.HIGHEST
INVERSE_BLOCK = 16  # diagonal blocks of (I + A) inverted by substitution; Triton's dot needs dims >= 16


# --------------------------------------------------------------------------------------------------------------
# Small building blocks


def dot(a, b, precision=HIGHEST):
    """a @ b in float32."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=F32)


def dot_nt(a, b, precision=HIGHEST):
    """a @ b^T in float32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=F32)


def dot_tn(a, b, precision=HIGHEST):
    """a^T @ b in float32."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision, preferred_element_type=F32)


def rowsum(x):
    """[C, N] -> [C, 1]."""
    return jnp.sum(x, axis=1, keepdims=True)


def _iotas(n: int):
    rows = lax.broadcasted_iota(jnp.int32, (n, n), 0)
    cols = lax.broadcasted_iota(jnp.int32, (n, n), 1)
    return rows, cols


def _as_f32(mask):
    return jnp.where(mask, jnp.float32(1.0), jnp.float32(0.0))


def _pick_column(x, cols, j: int):
    """x[:, j:j+1] of a [C, C] matrix, without slicing."""
    return rowsum(jnp.where(cols == j, x, 0.0))


@dataclasses.dataclass(frozen=True)
class ChunkDecay:
    """Decay quantities of one chunk (all float32)."""

    lower: jnp.ndarray      # bool [C, C], i >= j
    strict: jnp.ndarray     # bool [C, C], i > j
    rows: jnp.ndarray       # int32 [C, C] row index
    cols: jnp.ndarray       # int32 [C, C] column index
    decay: jnp.ndarray      # [C, C], D_ij = exp(G_i - G_j) on and below the diagonal, 0 above
    gamma: jnp.ndarray      # [C, 1], exp(G_i)
    e: jnp.ndarray          # [C, 1], exp(G_C - G_i)
    gl: jnp.ndarray         # [1, 1], exp(G_C)


def chunk_decay(g) -> ChunkDecay:
    """Within-chunk log decays by triangular-ones matmuls (no cumsum), masked BEFORE exp.

    Every log decay is summed directly over its own range of g (never as a difference G_i - G_j of two
    cumulative sums, which under strong decay, g ~ -10, cancels away float32 digits):
    log D_ij = sum_{j < s <= i} g_s, log gamma_i = sum_{s <= i} g_s, log e_i = sum_{s > i} g_s.
    """
    C = g.shape[0]
    rows, cols = _iotas(C)
    lower = rows >= cols
    strict = rows > cols
    lower_f = _as_f32(lower)
    gb = jnp.broadcast_to(g, (C, C))  # gb[s, j] = g_s
    log_d = dot(lower_f, jnp.where(strict, gb, 0.0))  # [i, j] = sum_s [s <= i][s > j] g_s  (0 for i <= j)
    decay = jnp.where(lower, jnp.exp(jnp.where(strict, log_d, 0.0)), 0.0)
    gamma = jnp.exp(_pick_column(dot(lower_f, gb), cols, 0))
    e = jnp.exp(_pick_column(dot(_as_f32(rows < cols), gb), cols, 0))
    gl = jnp.exp(jnp.sum(g, axis=0, keepdims=True))
    return ChunkDecay(lower, strict, rows, cols, decay, gamma, e, gl)


def unit_lower_inverse(a, rows, cols):
    """(I + a)^-1 for a strictly lower-triangular [C, C] float32 ``a``, by matmuls only.

    Stage 1: the 16x16 diagonal blocks by the fixed-point iteration t <- I - a_d t, which after 15 steps equals
    row forward substitution (row i is final after i steps) and is as accurate. Stage 2: with
    (I + a) = (I + a_d)(I + t_d a_o), the strictly block-lower n = t_d a_o is nilpotent of index C/16, so
    (I + n)^-1 = I - n (I - n (...)) (block substitution), and T = (I + n)^-1 t_d.
    Doubling (I - a)(I + a^2)(I + a^4)... is cheaper but loses all accuracy for correlated keys with beta ~ 1.
    """
    C = a.shape[0]
    b = min(INVERSE_BLOCK, C)
    eye = _as_f32(rows == cols)
    same_block = lax.div(rows, b) == lax.div(cols, b)
    a_d = jnp.where(same_block, a, 0.0)
    t_d = lax.fori_loop(0, b - 1, lambda _, t: eye - dot(a_d, t), eye)
    if C == b:
        return t_d
    n = dot(t_d, jnp.where(same_block, 0.0, a))
    y = lax.fori_loop(0, C // b - 1, lambda _, y: eye - dot(n, y), eye)
    return dot(y, t_d)


# --------------------------------------------------------------------------------------------------------------
# Forward


@dataclasses.dataclass(frozen=True)
class ChunkIntermediates:
    dec: ChunkDecay
    qk: jnp.ndarray          # [C, C] q k^T (unmasked)
    kk: jnp.ndarray | None   # [C, C] k k^T (delta rule only)
    t: jnp.ndarray | None    # [C, C] (I + A)^-1 (delta rule only)
    w: jnp.ndarray | None    # [C, Dk] (delta rule only)
    v_new: jnp.ndarray       # [C, Dv]


def _intermediates(q, k, v, g, beta, state, use_delta: bool, precision, need_qk: bool) -> ChunkIntermediates:
    dec = chunk_decay(g)
    qk = dot_nt(q, k, precision) if need_qk else None
    if use_delta:
        kk = dot_nt(k, k, precision)
        a = jnp.where(dec.strict, beta * kk * dec.decay, 0.0)
        t = unit_lower_inverse(a, dec.rows, dec.cols)
        w = dot(t, (beta * dec.gamma) * k, precision)
        u = dot(t, beta * v, precision)
        v_new = u - dot(w, state, precision)
    else:
        kk = t = w = None
        v_new = beta * v
    return ChunkIntermediates(dec, qk, kk, t, w, v_new)


def chunk_state_update(state, k, x: ChunkIntermediates, precision=HIGHEST):
    """S' = gl S + (diag(e) K)^T V_new."""
    return x.dec.gl * state + dot_tn(x.dec.e * k, x.v_new, precision)


def chunk_forward(q, k, v, g, beta, state, *, use_delta: bool, precision=HIGHEST, need_output: bool = True):
    """One chunk. Returns (o [C, Dv] or None, state at the chunk end [Dk, Dv]), float32."""
    x = _intermediates(q, k, v, g, beta, state, use_delta, precision, need_qk=need_output)
    o = None
    if need_output:
        p = x.qk * x.dec.decay
        o = dot(x.dec.gamma * q, state, precision) + dot(p, x.v_new, precision)
    return o, chunk_state_update(state, k, x, precision)


# --------------------------------------------------------------------------------------------------------------
# Backward


def _log_decay_grads(z, c, t_e, dgl, dec: ChunkDecay):
    """dg from the cotangents of the chunk's decays, each summed directly over the range of g it covers.

    z [C, C]: cotangent of log D_ij (i > j), which covers g_s for j < s <= i;
    c [C, 1]: cotangent of log gamma_i (covers s <= i);  t_e [C, 1]: of log e_i (covers s > i);
    dgl [1, 1]: of log gl (covers every s). Returns dg [C, 1]. By matmuls: no cumsum, no transpose.
    """
    C = c.shape[0]
    upper = _as_f32(dec.rows <= dec.cols)                      # upper[s, i] = [i >= s]
    pairs = rowsum(jnp.where(dec.strict, dot(upper, z), 0.0))  # sum_{j < s} sum_{i >= s} z_ij
    diag_c = jnp.where(dec.rows == dec.cols, jnp.broadcast_to(c, (C, C)), 0.0)
    diag_e = jnp.where(dec.rows == dec.cols, jnp.broadcast_to(t_e, (C, C)), 0.0)
    suffix = rowsum(dot(upper, diag_c))                        # sum_{i >= s} c_i
    prefix = rowsum(dot(_as_f32(dec.strict), diag_e))          # sum_{i < s} t_e_i
    return pairs + suffix + prefix + dgl


def chunk_backward(q, k, v, g, beta, state, do, ds_next, *, use_delta: bool, precision=HIGHEST):
    """Gradients of one chunk given the chunk-start state, d(output) and d(state at the chunk end).

    Returns (dq [C, Dk] (w.r.t. the scaled q), dk [C, Dk], dv [C, Dv], dg [C, 1], dbeta [C, 1],
    d(state at the chunk start) [Dk, Dv]), all float32. When the caller tiles Dv, every returned quantity except
    dv and the state gradient is a partial sum over value tiles.
    """
    x = _intermediates(q, k, v, g, beta, state, use_delta, precision, need_qk=True)
    dec = x.dec
    kdec = dec.e * k
    p = x.qk * dec.decay                                                   # tril(q k^T * D)

    dv_new = dot_tn(p, do, precision) + dot(kdec, ds_next, precision)      # [C, Dv]
    ds = dec.gl * ds_next + dot_tn(dec.gamma * q, do, precision)           # [Dk, Dv]
    dp = jnp.where(dec.lower, dot_nt(do, x.v_new, precision), 0.0)         # [C, C]
    dpd = dp * dec.decay
    qs = dot(q, state, precision)                                          # [C, Dv]
    dq = dec.gamma * dot_nt(do, state, precision) + dot(dpd, k, precision)
    dkdec = dot_nt(x.v_new, ds_next, precision)                            # [C, Dk]
    dk = dot_tn(dpd, q, precision) + dec.e * dkdec

    # Cotangents of the log decays (see _log_decay_grads): log e, log gl, log gamma, log D.
    t_e = rowsum(k * dkdec) * dec.e
    dgl = jnp.sum(jnp.sum(state * ds_next, axis=1, keepdims=True), axis=0, keepdims=True) * dec.gl  # [1, 1]
    c = dec.gamma * rowsum(qs * do)
    z = dpd * x.qk                                                         # dD * D (lower triangle)

    if use_delta:
        dw = -dot_nt(dv_new, state, precision)                             # [C, Dk]
        ds = ds - dot_tn(x.w, dv_new, precision)
        vb = beta * v
        bg = beta * dec.gamma
        kg = bg * k
        dt = dot_nt(dv_new, vb, precision) + dot_nt(dw, kg, precision)     # [C, C]
        dvb = dot_tn(x.t, dv_new, precision)                               # [C, Dv]
        dkg = dot_tn(x.t, dw, precision)                                   # [C, Dk]
        dv = beta * dvb
        kdkg = rowsum(dkg * k)
        dbeta = rowsum(dvb * v) + dec.gamma * kdkg
        dk = dk + bg * dkg
        c = c + bg * kdkg
        # dA = -T^T dT T^T on the strict lower triangle
        da = jnp.where(dec.strict, -dot_nt(dot_tn(x.t, dt, precision), x.t, precision), 0.0)
        dad = da * dec.decay
        bmat = beta * dad
        dk = dk + dot(bmat, k, precision) + dot_tn(bmat, k, precision)
        dbeta = dbeta + rowsum(dad * x.kk)
        z = z + bmat * x.kk
    else:
        dv = beta * dv_new
        dbeta = rowsum(dv_new * v)

    dg = _log_decay_grads(jnp.where(dec.strict, z, 0.0), c, t_e, dgl, dec)
    return dq, dk, dv, dg, dbeta, ds
