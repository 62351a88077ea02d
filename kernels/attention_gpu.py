"""GPU (Pallas Triton lowering) flash-attention kernels for window-local causal attention.

One program per (query block or key block, batch, head); each loops over its valid band of blocks only. Layouts:
q, o, do [B, Tp, H, D]; k, v [B, Tp, Hkv, D] (the model's layout: no transposes); lse, delta [B, H, Tp, 1]
float32. The Triton lowering is deprecated from JAX 0.11: these three kernels are the GPU Pallas surface of
attention (cuDNN is the GPU default where it supports the call, see ``backends.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ._matmul import dot
from ._pallas_util import triton_params
from .attention_blocks import (F32, NEG, Config, block_mask, finalize, key_range, online_softmax_step,
                               probs_and_dscores, query_range)


def _gpu_fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg: Config):
    bq, bk = cfg.bq, cfg.bk
    q_start = pl.program_id(0) * bq
    q = q_ref[...]
    D = q.shape[-1]
    lo, hi = key_range(q_start, bq, bk, cfg)

    def body(j, carry):
        k_start = pl.multiple_of(j * bk, bk)
        mask = block_mask(q_start, k_start, bq, bk, cfg)
        return online_softmax_step(q, k_ref[pl.ds(k_start, bk), :], v_ref[pl.ds(k_start, bk), :], *carry, mask,
                                    cfg)

    init = (jnp.full((bq, 1), NEG, F32), jnp.zeros((bq, 1), F32), jnp.zeros((bq, D), F32))
    o, lse = finalize(*lax.fori_loop(lo, hi, body, init))
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse


def _gpu_dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dk_ref, dv_ref, *, cfg: Config, r: int):
    bq, bk = cfg.bq_dkv, cfg.bk_dkv
    k_start = pl.program_id(0) * bk
    k, v = k_ref[...], v_ref[...]
    D = k.shape[-1]
    lo, hi = query_range(k_start, bq, bk, cfg)

    def head(j, carry):
        def body(i, carry):
            dk, dv = carry
            q_start = pl.multiple_of(i * bq, bq)
            rows = pl.ds(q_start, bq)
            q, do = q_ref[rows, j, :], do_ref[rows, j, :]
            mask = block_mask(q_start, k_start, bq, bk, cfg)
            p, ds = probs_and_dscores(q, k, v, do, lse_ref[j, rows, :], dl_ref[j, rows, :], mask, cfg)
            dv = dv + dot("qk,qd->kd", p.astype(do.dtype), do, precision=cfg.prec, accumulate=F32)
            dk = dk + dot("qk,qd->kd", ds.astype(q.dtype), q, precision=cfg.prec, accumulate=F32)
            return dk, dv

        return lax.fori_loop(lo, hi, body, carry)

    dk, dv = lax.fori_loop(0, r, head, (jnp.zeros((bk, D), F32), jnp.zeros((bk, D), F32)))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _gpu_dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dq_ref, *, cfg: Config):
    bq, bk = cfg.bq_dq, cfg.bk_dq
    q_start = pl.program_id(0) * bq
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], dl_ref[...]
    lo, hi = key_range(q_start, bq, bk, cfg)

    def body(j, dq):
        k_start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(k_start, bk), :]
        mask = block_mask(q_start, k_start, bq, bk, cfg)
        _, ds = probs_and_dscores(q, k, v_ref[pl.ds(k_start, bk), :], do, lse, delta, mask, cfg)
        return dq + dot("qk,kd->qd", ds.astype(k.dtype), k, precision=cfg.prec, accumulate=F32)

    dq = lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, F32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


# --------------------------------------------------------------------------------------------------------------
# pallas_call wrappers over prepared arrays


def _params(cfg: Config):
    return None if cfg.interpret else triton_params(cfg.num_warps, cfg.num_stages)


def _dims(q, k):
    B, Tp, H, D = q.shape
    return B, Tp, H, k.shape[2], D, H // k.shape[2]


def forward(cfg: Config, q, k, v):
    """(o [B, Tp, H, D], lse [B, H, Tp, 1] float32)."""
    B, Tp, H, Hkv, D, r = _dims(q, k)
    bq = cfg.bq
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, Tp, 1), F32)]
    kv_spec = pl.BlockSpec((None, Tp, None, D), lambda i, b, h: (b, 0, lax.div(h, r), 0))
    q_spec = pl.BlockSpec((None, bq, None, D), lambda i, b, h: (b, i, h, 0))
    return pl.pallas_call(
        functools.partial(_gpu_fwd_kernel, cfg=cfg), out_shape=out_shape, grid=(Tp // bq, B, H),
        in_specs=[q_spec, kv_spec, kv_spec],
        out_specs=[q_spec, pl.BlockSpec((None, None, bq, 1), lambda i, b, h: (b, h, i, 0))],
        compiler_params=_params(cfg), interpret=cfg.interpret, name="window_attention_fwd",
    )(q, k, v)


def dkv(cfg: Config, q, k, v, do, lse, delta):
    """(dk, dv) [B, Tp, Hkv, D]: one program per (key block, batch, KV head), summing over its query heads."""
    B, Tp, H, Hkv, D, r = _dims(q, k)
    bk = cfg.bk_dkv
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    kv_spec = pl.BlockSpec((None, bk, None, D), lambda i, b, h: (b, i, h, 0))
    qg_spec = pl.BlockSpec((None, Tp, r, D), lambda i, b, h: (b, 0, h, 0))
    st_spec = pl.BlockSpec((None, r, Tp, 1), lambda i, b, h: (b, h, 0, 0))
    return pl.pallas_call(
        functools.partial(_gpu_dkv_kernel, cfg=cfg, r=r), out_shape=out_shape, grid=(Tp // bk, B, Hkv),
        in_specs=[qg_spec, kv_spec, kv_spec, qg_spec, st_spec, st_spec], out_specs=[kv_spec, kv_spec],
        compiler_params=_params(cfg), interpret=cfg.interpret, name="window_attention_dkv",
    )(q, k, v, do, lse, delta)


def dq(cfg: Config, q, k, v, do, lse, delta):
    """dq [B, Tp, H, D]."""
    B, Tp, H, Hkv, D, r = _dims(q, k)
    bq = cfg.bq_dq
    kv_spec = pl.BlockSpec((None, Tp, None, D), lambda i, b, h: (b, 0, lax.div(h, r), 0))
    q_spec = pl.BlockSpec((None, bq, None, D), lambda i, b, h: (b, i, h, 0))
    st_spec = pl.BlockSpec((None, None, bq, 1), lambda i, b, h: (b, h, i, 0))
    return pl.pallas_call(
        functools.partial(_gpu_dq_kernel, cfg=cfg), out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(Tp // bq, B, H), in_specs=[q_spec, kv_spec, kv_spec, q_spec, st_spec, st_spec], out_specs=q_spec,
        compiler_params=_params(cfg), interpret=cfg.interpret, name="window_attention_dq",
    )(q, k, v, do, lse, delta)
