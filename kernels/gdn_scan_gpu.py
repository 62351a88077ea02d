"""GPU (Pallas Triton lowering) kernels of the GDN state scan: the forward and the reverse, two matmuls per chunk.

GPU programs run in parallel, so each program owns one (batch, head, value tile) and walks the chunks with a
``lax.fori_loop``, carrying its [Dk, block_v] slice of the state (float32) in registers. Value tiles are
independent (every matmul here keeps the value axis), so nothing is reduced across programs. Grid
(B, H, Dv / block_v). This is the whole GPU Pallas surface of the gated delta rule: moving to Mosaic GPU (the
Triton lowering is deprecated from JAX 0.11) means rewriting these two kernels.

Layouts: w, kdec [B, H, Tp, Dk]; u, v_new [B, H, Tp, Dv] (operand dtype); g [B, H, Tp, 1] float32;
states [B, H, n, Dk, Dv] operand dtype; s0, sT [B, H, Dk, Dv] float32. Tp = n * chunk; chunk, Dk, block_v are
powers of two >= 16 (Triton loads and dots).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ._matmul import dot
from ._pallas_util import triton_params

F32 = jnp.float32


def _gate(g_ref, rows):
    """exp(sum of the chunk's log decays), [1, 1]."""
    return jnp.exp(jnp.sum(g_ref[rows, :], axis=0, keepdims=True))


def _forward_kernel(*refs, n: int, chunk: int, use_delta: bool):
    if use_delta:
        w_ref, u_ref, kd_ref, g_ref, s0_ref, st_ref, vn_ref, sT_ref = refs
    else:
        u_ref, kd_ref, g_ref, s0_ref, st_ref, sT_ref = refs
    op = st_ref.dtype

    def body(c, S):
        rows = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)
        S_op = S.astype(op)
        st_ref[c] = S_op
        if use_delta:
            vn = (u_ref[rows, :].astype(F32) - dot("ck,kv->cv", w_ref[rows, :], S_op)).astype(op)
            vn_ref[rows, :] = vn
        else:
            vn = u_ref[rows, :]
        return _gate(g_ref, rows) * S + dot("ck,cv->kv", kd_ref[rows, :], vn)

    sT_ref[...] = lax.fori_loop(0, n, body, s0_ref[...])


def _reverse_kernel(*refs, n: int, chunk: int, use_delta: bool):
    if use_delta:
        w_ref, kd_ref, g_ref, dst_ref, dvin_ref, dsT_ref, dh_ref, dvn_ref, ds0_ref = refs
    else:
        kd_ref, g_ref, dst_ref, dvin_ref, dsT_ref, dh_ref, dvn_ref, ds0_ref = refs
    op = dh_ref.dtype

    def body(i, X):
        c = n - 1 - i
        rows = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)
        X_op = X.astype(op)
        dh_ref[c] = X_op
        dvn = (dvin_ref[rows, :].astype(F32) + dot("ck,kv->cv", kd_ref[rows, :], X_op)).astype(op)
        dvn_ref[rows, :] = dvn
        X = _gate(g_ref, rows) * X + dst_ref[c].astype(F32)
        if use_delta:
            X = X - dot("ck,cv->kv", w_ref[rows, :], dvn)
        return X

    ds0_ref[...] = lax.fori_loop(0, n, body, dsT_ref[...])


def _specs(Tp: int, n: int, Dk: int, bv: int):
    keys = pl.BlockSpec((None, None, Tp, Dk), lambda b, h, j: (b, h, 0, 0))
    values = pl.BlockSpec((None, None, Tp, bv), lambda b, h, j: (b, h, 0, j))
    gates = pl.BlockSpec((None, None, Tp, 1), lambda b, h, j: (b, h, 0, 0))
    state = pl.BlockSpec((None, None, Dk, bv), lambda b, h, j: (b, h, 0, j))
    states = pl.BlockSpec((None, None, n, Dk, bv), lambda b, h, j: (b, h, 0, 0, j))
    return keys, values, gates, state, states


def forward(w, u, kdec, g, s0, *, cfg, chunk: int):
    """Returns (states [B, H, n, Dk, Dv], v_new [B, H, Tp, Dv] or None when use_delta=False, sT)."""
    B, H, Tp, Dk = kdec.shape
    Dv, n, bv, op = u.shape[-1], Tp // chunk, cfg.block_v, u.dtype
    keys, values, gates, state, states = _specs(Tp, n, Dk, bv)
    in_specs = ([keys] if cfg.use_delta else []) + [values, keys, gates, state]
    out_specs = [states] + ([values] if cfg.use_delta else []) + [state]
    out_shape = ([jax.ShapeDtypeStruct((B, H, n, Dk, Dv), op)]
                 + ([jax.ShapeDtypeStruct(u.shape, op)] if cfg.use_delta else [])
                 + [jax.ShapeDtypeStruct(s0.shape, F32)])
    outs = pl.pallas_call(
        functools.partial(_forward_kernel, n=n, chunk=chunk, use_delta=cfg.use_delta),
        out_shape=out_shape, grid=(B, H, Dv // bv), in_specs=in_specs, out_specs=out_specs,
        compiler_params=None if cfg.interpret else triton_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret, name="gdn_state_scan",
    )(*(([w] if cfg.use_delta else []) + [u, kdec, g, s0]))
    return (outs[0], outs[1], outs[2]) if cfg.use_delta else (outs[0], None, outs[1])


def reverse(w, kdec, g, d_states, d_vnew, d_sT, *, cfg, chunk: int):
    """Returns (dh [B, H, n, Dk, Dv], dv_new [B, H, Tp, Dv], d(initial state) [B, H, Dk, Dv] float32)."""
    B, H, Tp, Dk = kdec.shape
    Dv, n, bv, op = d_vnew.shape[-1], Tp // chunk, cfg.block_v, kdec.dtype
    keys, values, gates, state, states = _specs(Tp, n, Dk, bv)
    in_specs = ([keys] if cfg.use_delta else []) + [keys, gates, states, values, state]
    out_shape = [jax.ShapeDtypeStruct(d_states.shape, op), jax.ShapeDtypeStruct(d_vnew.shape, op),
                 jax.ShapeDtypeStruct(d_sT.shape, F32)]
    return pl.pallas_call(
        functools.partial(_reverse_kernel, n=n, chunk=chunk, use_delta=cfg.use_delta),
        out_shape=out_shape, grid=(B, H, Dv // bv), in_specs=in_specs, out_specs=[states, values, state],
        compiler_params=None if cfg.interpret else triton_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret, name="gdn_state_scan_reverse",
    )(*(([w] if cfg.use_delta else []) + [kdec, g, d_states, d_vnew, d_sT]))
