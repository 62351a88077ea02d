"""TPU (Mosaic) flash-attention kernels for window-local causal attention.

The inner (band) grid axis is "arbitrary"; accumulators live in VMEM scratch. The key grid axis has only as many
steps as the widest valid band: the index maps clamp into the band (no new DMA) and ``pl.when`` skips the
compute. Layouts: q, o, do [B, H, Tp, D]; k, v [B, Hkv, Tp, D] (time second-minor: the (8, 128) block rule);
lse, delta [B, H, Tp, 1] float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ._matmul import dot
from .attention_blocks import (F32, NEG, Config, block_mask, finalize, key_range, max_band,
                               online_softmax_step, probs_and_dscores, query_range)


def _tpu_fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr, *, cfg: Config, nk: int):
    bq, bk = cfg.bq, cfg.bk
    q_start = pl.program_id(2) * bq
    j = pl.program_id(3)
    lo, hi = key_range(q_start, bq, bk, cfg)

    @pl.when(j == 0)
    def _():
        m_scr[...] = jnp.full(m_scr.shape, NEG, F32)
        l_scr[...] = jnp.zeros(l_scr.shape, F32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, F32)

    @pl.when(lo + j < hi)
    def _():
        mask = block_mask(q_start, (lo + j) * bk, bq, bk, cfg)
        m, l, acc = online_softmax_step(q_ref[...], k_ref[...], v_ref[...], m_scr[...], l_scr[...], acc_scr[...],
                                         mask, cfg)
        m_scr[...] = m
        l_scr[...] = l
        acc_scr[...] = acc

    @pl.when(j == nk - 1)
    def _():
        o, lse = finalize(m_scr[...], l_scr[...], acc_scr[...])
        o_ref[...] = o.astype(o_ref.dtype)
        lse_ref[...] = lse


def _tpu_dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dk_ref, dv_ref, dk_scr, dv_scr, *, cfg: Config,
                    r: int, nq: int):
    bq, bk = cfg.bq_dkv, cfg.bk_dkv
    k_start = pl.program_id(2) * bk
    j, i = pl.program_id(3), pl.program_id(4)
    lo, hi = query_range(k_start, bq, bk, cfg)

    @pl.when((j == 0) & (i == 0))
    def _():
        dk_scr[...] = jnp.zeros(dk_scr.shape, F32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, F32)

    @pl.when(lo + i < hi)
    def _():
        q, do = q_ref[...], do_ref[...]
        mask = block_mask((lo + i) * bq, k_start, bq, bk, cfg)
        p, ds = probs_and_dscores(q, k_ref[...], v_ref[...], do, lse_ref[...], dl_ref[...], mask, cfg)
        dv_scr[...] += dot("qk,qd->kd", p.astype(do.dtype), do, precision=cfg.prec, accumulate=F32)
        dk_scr[...] += dot("qk,qd->kd", ds.astype(q.dtype), q, precision=cfg.prec, accumulate=F32)

    @pl.when((j == r - 1) & (i == nq - 1))
    def _():
        dk_ref[...] = (dk_scr[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _tpu_dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dq_ref, dq_scr, *, cfg: Config, nk: int):
    bq, bk = cfg.bq_dq, cfg.bk_dq
    q_start = pl.program_id(2) * bq
    j = pl.program_id(3)
    lo, hi = key_range(q_start, bq, bk, cfg)

    @pl.when(j == 0)
    def _():
        dq_scr[...] = jnp.zeros(dq_scr.shape, F32)

    @pl.when(lo + j < hi)
    def _():
        k = k_ref[...]
        mask = block_mask(q_start, (lo + j) * bk, bq, bk, cfg)
        _, ds = probs_and_dscores(q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...], dl_ref[...], mask, cfg)
        dq_scr[...] += dot("qk,kd->qd", ds.astype(k.dtype), k, precision=cfg.prec, accumulate=F32)

    @pl.when(j == nk - 1)
    def _():
        dq_ref[...] = (dq_scr[...] * cfg.scale).astype(dq_ref.dtype)


# --------------------------------------------------------------------------------------------------------------
# pallas_call wrappers over prepared arrays


def _params(cfg: Config, n_arbitrary: int, n_parallel: int = 3):
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * n_parallel + ("arbitrary",) * n_arbitrary,
                                vmem_limit_bytes=cfg.vmem_limit_bytes)


def _dims(q, k):
    B, H, Tp, D = q.shape
    return B, Tp, H, k.shape[1], D, H // k.shape[1]


def forward(cfg: Config, q, k, v):
    """(o [B, H, Tp, D], lse [B, H, Tp, 1] float32)."""
    B, Tp, H, Hkv, D, r = _dims(q, k)
    bq, bk = cfg.bq, cfg.bk
    nq = Tp // bq
    nk = max_band(nq, bq, lambda s: key_range(s, bq, bk, cfg))

    def kv_index(b, h, i, j):
        lo, hi = key_range(i * bq, bq, bk, cfg)
        return (b, lax.div(h, r), jnp.minimum(lo + j, hi - 1), 0)

    q_spec = pl.BlockSpec((None, None, bq, D), lambda b, h, i, j: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, D), kv_index)
    return pl.pallas_call(
        functools.partial(_tpu_fwd_kernel, cfg=cfg, nk=nk),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, Tp, 1), F32)],
        grid=(B, H, nq, nk), in_specs=[q_spec, kv_spec, kv_spec],
        out_specs=[q_spec, pl.BlockSpec((None, None, bq, 1), lambda b, h, i, j: (b, h, i, 0))],
        scratch_shapes=[pltpu.VMEM((bq, 1), F32), pltpu.VMEM((bq, 1), F32), pltpu.VMEM((bq, D), F32)],
        compiler_params=_params(cfg, 1), interpret=cfg.interpret, name="window_attention_fwd",
    )(q, k, v)


def dkv(cfg: Config, q, k, v, do, lse, delta):
    """(dk, dv) [B, Hkv, Tp, D]; grid (B, Hkv, key block, query head of the group, query band)."""
    B, Tp, H, Hkv, D, r = _dims(q, k)
    bq, bk = cfg.bq_dkv, cfg.bk_dkv
    nk = Tp // bk
    nq = max_band(nk, bk, lambda s: query_range(s, bq, bk, cfg))

    def q_index(b, h, kb, j, i):
        lo, hi = query_range(kb * bk, bq, bk, cfg)
        return (b, h * r + j, jnp.maximum(jnp.minimum(lo + i, hi - 1), 0), 0)

    q_spec = pl.BlockSpec((None, None, bq, D), q_index)
    st_spec = pl.BlockSpec((None, None, bq, 1), q_index)
    kv_spec = pl.BlockSpec((None, None, bk, D), lambda b, h, kb, j, i: (b, h, kb, 0))
    return pl.pallas_call(
        functools.partial(_tpu_dkv_kernel, cfg=cfg, r=r, nq=nq),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        grid=(B, Hkv, nk, r, nq), in_specs=[q_spec, kv_spec, kv_spec, q_spec, st_spec, st_spec],
        out_specs=[kv_spec, kv_spec], scratch_shapes=[pltpu.VMEM((bk, D), F32), pltpu.VMEM((bk, D), F32)],
        compiler_params=_params(cfg, 2), interpret=cfg.interpret, name="window_attention_dkv",
    )(q, k, v, do, lse, delta)


def dq(cfg: Config, q, k, v, do, lse, delta):
    """dq [B, H, Tp, D]."""
    B, Tp, H, Hkv, D, r = _dims(q, k)
    bq, bk = cfg.bq_dq, cfg.bk_dq
    nq = Tp // bq
    nk = max_band(nq, bq, lambda s: key_range(s, bq, bk, cfg))

    def kv_index(b, h, i, j):
        lo, hi = key_range(i * bq, bq, bk, cfg)
        return (b, lax.div(h, r), jnp.minimum(lo + j, hi - 1), 0)

    q_spec = pl.BlockSpec((None, None, bq, D), lambda b, h, i, j: (b, h, i, 0))
    st_spec = pl.BlockSpec((None, None, bq, 1), lambda b, h, i, j: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, D), kv_index)
    return pl.pallas_call(
        functools.partial(_tpu_dq_kernel, cfg=cfg, nk=nk), out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(B, H, nq, nk), in_specs=[q_spec, kv_spec, kv_spec, q_spec, st_spec, st_spec], out_specs=q_spec,
        scratch_shapes=[pltpu.VMEM((bq, D), F32)], compiler_params=_params(cfg, 1), interpret=cfg.interpret,
        name="window_attention_dq",
    )(q, k, v, do, lse, delta)
