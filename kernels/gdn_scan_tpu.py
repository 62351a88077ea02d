"""TPU (Mosaic) kernels of the GDN state scan: the forward and the reverse, two matmuls per chunk.

TPU grids run in order, so the chunk axis is the last grid axis, marked "arbitrary" (sequential), and the
[Dk, block_v] float32 state is carried across its steps in a VMEM scratch buffer; the reverse walks the chunks
backwards through its index maps. Grid (B, H, Dv / block_v, n). Per-token log decays arrive as a [C, 1] column
and are summed in the kernel (Mosaic has no cumsum; a plain reduction is all that is needed here).

Layouts as in ``gdn_scan_gpu``: w, kdec [B, H, Tp, Dk]; u, v_new [B, H, Tp, Dv]; g [B, H, Tp, 1] float32;
states [B, H, n, Dk, Dv]; s0, sT [B, H, Dk, Dv] float32. Blocks keep the (8, 128) rule: (chunk, Dk) and
(chunk, block_v) with chunk a multiple of 16, block_v = Dv or a multiple of 128.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ._matmul import dot

F32 = jnp.float32


def _gate(g_ref):
    return jnp.exp(jnp.sum(g_ref[...], axis=0, keepdims=True))


def _forward_kernel(*refs, n: int, use_delta: bool):
    if use_delta:
        w_ref, u_ref, kd_ref, g_ref, s0_ref, st_ref, vn_ref, sT_ref, s_scr = refs
    else:
        u_ref, kd_ref, g_ref, s0_ref, st_ref, sT_ref, s_scr = refs
    op = st_ref.dtype
    c = pl.program_id(3)

    @pl.when(c == 0)
    def _():
        s_scr[...] = s0_ref[...]

    S = s_scr[...]
    S_op = S.astype(op)
    st_ref[...] = S_op
    if use_delta:
        vn = (u_ref[...].astype(F32) - dot("ck,kv->cv", w_ref[...], S_op)).astype(op)
        vn_ref[...] = vn
    else:
        vn = u_ref[...]
    S = _gate(g_ref) * S + dot("ck,cv->kv", kd_ref[...], vn)
    s_scr[...] = S

    @pl.when(c == n - 1)
    def _():
        sT_ref[...] = S


def _reverse_kernel(*refs, n: int, use_delta: bool):
    if use_delta:
        w_ref, kd_ref, g_ref, dst_ref, dvin_ref, dsT_ref, dh_ref, dvn_ref, ds0_ref, x_scr = refs
    else:
        kd_ref, g_ref, dst_ref, dvin_ref, dsT_ref, dh_ref, dvn_ref, ds0_ref, x_scr = refs
    op = dh_ref.dtype
    i = pl.program_id(3)  # chunk n - 1 - i (reversed by the index maps)

    @pl.when(i == 0)
    def _():
        x_scr[...] = dsT_ref[...]

    X = x_scr[...]
    X_op = X.astype(op)
    dh_ref[...] = X_op
    dvn = (dvin_ref[...].astype(F32) + dot("ck,kv->cv", kd_ref[...], X_op)).astype(op)
    dvn_ref[...] = dvn
    X = _gate(g_ref) * X + dst_ref[...].astype(F32)
    if use_delta:
        X = X - dot("ck,cv->kv", w_ref[...], dvn)
    x_scr[...] = X

    @pl.when(i == n - 1)
    def _():
        ds0_ref[...] = X


def _specs(chunk: int, n: int, Dk: int, bv: int, reverse: bool):
    at = (lambda i: n - 1 - i) if reverse else (lambda i: i)
    keys = pl.BlockSpec((None, None, chunk, Dk), lambda b, h, j, i: (b, h, at(i), 0))
    values = pl.BlockSpec((None, None, chunk, bv), lambda b, h, j, i: (b, h, at(i), j))
    gates = pl.BlockSpec((None, None, chunk, 1), lambda b, h, j, i: (b, h, at(i), 0))
    state = pl.BlockSpec((None, None, Dk, bv), lambda b, h, j, i: (b, h, 0, j))
    states = pl.BlockSpec((None, None, None, Dk, bv), lambda b, h, j, i: (b, h, at(i), 0, j))
    return keys, values, gates, state, states


def _params(cfg):
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
                                vmem_limit_bytes=cfg.vmem_limit_bytes)


def forward(w, u, kdec, g, s0, *, cfg, chunk: int):
    """Returns (states [B, H, n, Dk, Dv], v_new [B, H, Tp, Dv] or None when use_delta=False, sT)."""
    B, H, Tp, Dk = kdec.shape
    Dv, n, bv, op = u.shape[-1], Tp // chunk, cfg.block_v, u.dtype
    keys, values, gates, state, states = _specs(chunk, n, Dk, bv, reverse=False)
    in_specs = ([keys] if cfg.use_delta else []) + [values, keys, gates, state]
    out_specs = [states] + ([values] if cfg.use_delta else []) + [state]
    out_shape = ([jax.ShapeDtypeStruct((B, H, n, Dk, Dv), op)]
                 + ([jax.ShapeDtypeStruct(u.shape, op)] if cfg.use_delta else [])
                 + [jax.ShapeDtypeStruct(s0.shape, F32)])
    outs = pl.pallas_call(
        functools.partial(_forward_kernel, n=n, use_delta=cfg.use_delta),
        out_shape=out_shape, grid=(B, H, Dv // bv, n), in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((Dk, bv), F32)], compiler_params=_params(cfg), interpret=cfg.interpret,
        name="gdn_state_scan",
    )(*(([w] if cfg.use_delta else []) + [u, kdec, g, s0]))
    return (outs[0], outs[1], outs[2]) if cfg.use_delta else (outs[0], None, outs[1])


def reverse(w, kdec, g, d_states, d_vnew, d_sT, *, cfg, chunk: int):
    """Returns (dh [B, H, n, Dk, Dv], dv_new [B, H, Tp, Dv], d(initial state) [B, H, Dk, Dv] float32)."""
    B, H, Tp, Dk = kdec.shape
    Dv, n, bv, op = d_vnew.shape[-1], Tp // chunk, cfg.block_v, kdec.dtype
    keys, values, gates, state, states = _specs(chunk, n, Dk, bv, reverse=True)
    in_specs = ([keys] if cfg.use_delta else []) + [keys, gates, states, values, state]
    out_shape = [jax.ShapeDtypeStruct(d_states.shape, op), jax.ShapeDtypeStruct(d_vnew.shape, op),
                 jax.ShapeDtypeStruct(d_sT.shape, F32)]
    return pl.pallas_call(
        functools.partial(_reverse_kernel, n=n, use_delta=cfg.use_delta),
        out_shape=out_shape, grid=(B, H, Dv // bv, n), in_specs=in_specs, out_specs=[states, values, state],
        scratch_shapes=[pltpu.VMEM((Dk, bv), F32)], compiler_params=_params(cfg), interpret=cfg.interpret,
        name="gdn_state_scan_reverse",
    )(*(([w] if cfg.use_delta else []) + [kdec, g, d_states, d_vnew, d_sT]))
