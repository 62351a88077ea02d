"""Pallas flash attention for window-local causal attention: GPU (Triton lowering) and TPU (Mosaic).

Entry point: :func:`window_attention_pallas` (same contract as ``attention.window_attention``). Online softmax with
float32 statistics (running max m, normaliser l, accumulator), causal within the window, optional sliding window
(query i sees keys i - w + 1 ... i), grouped KV heads (query head h reads KV head h // (H / Hkv)).

Key blocks that are fully masked for a query block (above the diagonal, or older than the sliding window) are
SKIPPED: on GPU the key loop runs over [lo, hi) only; on TPU the key grid axis has only as many steps as the
widest valid band, the index maps clamp into the band (no new DMA) and ``pl.when`` skips the compute. So the cost
of a sliding-window attention grows with T * w, not T^2. The backward mirrors this for query blocks.

Backward (``jax.custom_vjp``): delta = rowsum(dO * O) in XLA, then a dK/dV kernel (one program per key block and
KV head, accumulating over the query heads of its group and the valid query blocks) and a dQ kernel. The forward
saves the log-sum-exp (float32, [B, H, T, 1]) for the backward.

Layouts: GPU kernels read the model's [B, T, H, D] layout directly; TPU kernels get [B, H, T, D] (time is the
second-minor dim: (8, 128) block rule). T is padded to the block size and D to a power of two >= 16 with zeros
(exact: padded keys are masked, padded dims add 0 to q.k).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from . import attention
from ._pallas_util import next_pow2, resolve_interpret, resolve_platform

F32 = jnp.float32
_NEG = -1e30  # finite "minus infinity" for masked scores and the initial running max
_PRECISIONS = {"highest": lax.Precision.HIGHEST, "default": lax.Precision.DEFAULT}


@dataclasses.dataclass(frozen=True)
class AttentionBlockSizes:
    """Tiles and compiler knobs (``None`` = platform default: 64 on GPU, 128 on TPU; clipped for short T).

    All block sizes must be powers of two >= 16. ``precision`` applies to float32 inputs: "highest" (exact
    float32 matmuls, default) or "default" (TF32 on GPU / bf16 passes on TPU); bfloat16 inputs always use the
    native bf16 x bf16 -> f32 matmul.
    """

    block_q: int | None = None
    block_k: int | None = None
    block_q_dkv: int | None = None
    block_k_dkv: int | None = None
    block_q_dq: int | None = None
    block_k_dq: int | None = None
    num_warps: int = 4
    num_stages: int = 2
    vmem_limit_bytes: int | None = None
    precision: str = "highest"

    @classmethod
    def get_default(cls, platform: str) -> "AttentionBlockSizes":
        b = 128 if platform == "tpu" else 64
        return cls(block_q=b, block_k=b, block_q_dkv=b, block_k_dkv=b, block_q_dq=b, block_k_dq=b)


_BLOCK_FIELDS = ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq")


@dataclasses.dataclass(frozen=True)
class _Config:
    platform: str
    interpret: Any  # bool, or pltpu.InterpretParams (TPU wrapper)
    scale: float
    window: int | None
    T: int            # true sequence length (keys at positions >= T are padding)
    bq: int
    bk: int
    bq_dkv: int
    bk_dkv: int
    bq_dq: int
    bk_dq: int
    num_warps: int
    num_stages: int
    vmem_limit_bytes: int | None
    precision: str

    @property
    def prec(self):
        return _PRECISIONS[self.precision]


# --------------------------------------------------------------------------------------------------------------
# Block ranges (work on Python ints and on traced int32 scalars alike)


def _imin(a, b):
    return min(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.minimum(a, b)


def _imax(a, b):
    return max(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.maximum(a, b)


def _idiv(a, b: int):
    """Division of a non-negative index by a positive block size."""
    return a // b if isinstance(a, int) else lax.div(a, jnp.int32(b))


def _key_range(q_start, bq: int, bk: int, cfg: _Config):
    """[lo, hi) of key blocks a query block starting at q_start must visit."""
    hi = _imin(_idiv(q_start + bq - 1, bk) + 1, pl.cdiv(cfg.T, bk))
    lo = 0 if cfg.window is None else _idiv(_imax(q_start - cfg.window + 1, 0), bk)
    return lo, hi


def _query_range(k_start, bq: int, bk: int, cfg: _Config):
    """[lo, hi) of query blocks that see any key of the key block starting at k_start (padded rows excluded)."""
    lo = _idiv(k_start, bq)
    hi = pl.cdiv(cfg.T, bq)
    if cfg.window is not None:
        hi = _imin(_idiv(k_start + bk - 1 + cfg.window - 1, bq) + 1, hi)
    return lo, hi


def _max_band(n_outer: int, b_outer: int, range_fn) -> int:
    """Largest hi - lo over the outer blocks (static Python ints): the length of the TPU inner grid axis."""
    return max(1, max(hi - lo for lo, hi in (range_fn(i * b_outer) for i in range(n_outer))))


# --------------------------------------------------------------------------------------------------------------
# Per-block math shared by both wrappers. Statistics are [bq, 1] float32 columns.


def _mask(q_start, k_start, bq: int, bk: int, cfg: _Config):
    qpos = q_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    kpos = k_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    mask = (kpos <= qpos) & (kpos < cfg.T)
    if cfg.window is not None:
        mask = mask & (qpos - kpos < cfg.window)
    return mask


def _scores(q, k, mask, cfg: _Config):
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=cfg.prec, preferred_element_type=F32)
    return jnp.where(mask, s * cfg.scale, _NEG)


def _dot(a, b, cfg, ta=False):
    dims = (((0,), (0,)), ((), ())) if ta else (((1,), (0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=cfg.prec, preferred_element_type=F32)


def _dot_nt(a, b, cfg):
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=cfg.prec, preferred_element_type=F32)


def _online_softmax_step(q, k, v, m, l, acc, mask, cfg: _Config):
    s = _scores(q, k, mask, cfg)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    acc = alpha * acc + _dot(p.astype(v.dtype), v, cfg)
    return m_new, l, acc


def _finalize(m, l, acc):
    empty = l == 0.0  # only padded query rows can see no key
    o = acc / jnp.where(empty, 1.0, l)
    lse = jnp.where(empty, -_NEG, m + jnp.log(jnp.where(empty, 1.0, l)))  # +1e30: exp(s - lse) = 0
    return o, lse


def _probs_and_dscores(q, k, v, do, lse, delta, mask, cfg: _Config):
    s = _scores(q, k, mask, cfg)
    p = jnp.where(mask, jnp.exp(s - lse), 0.0)
    dp = _dot_nt(do, v, cfg)
    ds = p * (dp - delta)
    return p, ds


# --------------------------------------------------------------------------------------------------------------
# GPU (Triton) kernels: one program per (query block or key block, batch, head); loops over the valid band.


def _gpu_fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg: _Config):
    bq, bk = cfg.bq, cfg.bk
    q_start = pl.program_id(0) * bq
    q = q_ref[...]
    D = q.shape[-1]
    lo, hi = _key_range(q_start, bq, bk, cfg)

    def body(j, carry):
        k_start = pl.multiple_of(j * bk, bk)
        mask = _mask(q_start, k_start, bq, bk, cfg)
        return _online_softmax_step(q, k_ref[pl.ds(k_start, bk), :], v_ref[pl.ds(k_start, bk), :], *carry, mask,
                                    cfg)

    init = (jnp.full((bq, 1), _NEG, F32), jnp.zeros((bq, 1), F32), jnp.zeros((bq, D), F32))
    o, lse = _finalize(*lax.fori_loop(lo, hi, body, init))
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse


def _gpu_dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dk_ref, dv_ref, *, cfg: _Config, r: int):
    bq, bk = cfg.bq_dkv, cfg.bk_dkv
    k_start = pl.program_id(0) * bk
    k, v = k_ref[...], v_ref[...]
    D = k.shape[-1]
    lo, hi = _query_range(k_start, bq, bk, cfg)

    def head(j, carry):
        def body(i, carry):
            dk, dv = carry
            q_start = pl.multiple_of(i * bq, bq)
            rows = pl.ds(q_start, bq)
            q, do = q_ref[rows, j, :], do_ref[rows, j, :]
            mask = _mask(q_start, k_start, bq, bk, cfg)
            p, ds = _probs_and_dscores(q, k, v, do, lse_ref[j, rows, :], dl_ref[j, rows, :], mask, cfg)
            dv = dv + _dot(p.astype(do.dtype), do, cfg, ta=True)
            dk = dk + _dot(ds.astype(q.dtype), q, cfg, ta=True)
            return dk, dv

        return lax.fori_loop(lo, hi, body, carry)

    dk, dv = lax.fori_loop(0, r, head, (jnp.zeros((bk, D), F32), jnp.zeros((bk, D), F32)))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _gpu_dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dq_ref, *, cfg: _Config):
    bq, bk = cfg.bq_dq, cfg.bk_dq
    q_start = pl.program_id(0) * bq
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], dl_ref[...]
    lo, hi = _key_range(q_start, bq, bk, cfg)

    def body(j, dq):
        k_start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(k_start, bk), :]
        mask = _mask(q_start, k_start, bq, bk, cfg)
        _, ds = _probs_and_dscores(q, k, v_ref[pl.ds(k_start, bk), :], do, lse, delta, mask, cfg)
        return dq + _dot(ds.astype(k.dtype), k, cfg)

    dq = lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, F32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


# --------------------------------------------------------------------------------------------------------------
# TPU (Mosaic) kernels: the inner (band) grid axis is "arbitrary"; accumulators live in VMEM scratch.


def _tpu_fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr, *, cfg: _Config, nk: int):
    bq, bk = cfg.bq, cfg.bk
    q_start = pl.program_id(2) * bq
    j = pl.program_id(3)
    lo, hi = _key_range(q_start, bq, bk, cfg)

    @pl.when(j == 0)
    def _():
        m_scr[...] = jnp.full(m_scr.shape, _NEG, F32)
        l_scr[...] = jnp.zeros(l_scr.shape, F32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, F32)

    @pl.when(lo + j < hi)
    def _():
        mask = _mask(q_start, (lo + j) * bk, bq, bk, cfg)
        m, l, acc = _online_softmax_step(q_ref[...], k_ref[...], v_ref[...], m_scr[...], l_scr[...], acc_scr[...],
                                         mask, cfg)
        m_scr[...] = m
        l_scr[...] = l
        acc_scr[...] = acc

    @pl.when(j == nk - 1)
    def _():
        o, lse = _finalize(m_scr[...], l_scr[...], acc_scr[...])
        o_ref[...] = o.astype(o_ref.dtype)
        lse_ref[...] = lse


def _tpu_dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dk_ref, dv_ref, dk_scr, dv_scr, *, cfg: _Config,
                    r: int, nq: int):
    bq, bk = cfg.bq_dkv, cfg.bk_dkv
    k_start = pl.program_id(2) * bk
    j, i = pl.program_id(3), pl.program_id(4)
    lo, hi = _query_range(k_start, bq, bk, cfg)

    @pl.when((j == 0) & (i == 0))
    def _():
        dk_scr[...] = jnp.zeros(dk_scr.shape, F32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, F32)

    @pl.when(lo + i < hi)
    def _():
        q, do = q_ref[...], do_ref[...]
        mask = _mask((lo + i) * bq, k_start, bq, bk, cfg)
        p, ds = _probs_and_dscores(q, k_ref[...], v_ref[...], do, lse_ref[...], dl_ref[...], mask, cfg)
        dv_scr[...] += _dot(p.astype(do.dtype), do, cfg, ta=True)
        dk_scr[...] += _dot(ds.astype(q.dtype), q, cfg, ta=True)

    @pl.when((j == r - 1) & (i == nq - 1))
    def _():
        dk_ref[...] = (dk_scr[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _tpu_dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dq_ref, dq_scr, *, cfg: _Config, nk: int):
    bq, bk = cfg.bq_dq, cfg.bk_dq
    q_start = pl.program_id(2) * bq
    j = pl.program_id(3)
    lo, hi = _key_range(q_start, bq, bk, cfg)

    @pl.when(j == 0)
    def _():
        dq_scr[...] = jnp.zeros(dq_scr.shape, F32)

    @pl.when(lo + j < hi)
    def _():
        k = k_ref[...]
        mask = _mask(q_start, (lo + j) * bk, bq, bk, cfg)
        _, ds = _probs_and_dscores(q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...], dl_ref[...], mask, cfg)
        dq_scr[...] += _dot(ds.astype(k.dtype), k, cfg)

    @pl.when(j == nk - 1)
    def _():
        dq_ref[...] = (dq_scr[...] * cfg.scale).astype(dq_ref.dtype)


# --------------------------------------------------------------------------------------------------------------
# pallas_call wrappers over prepared arrays:
#   GPU: q, o, do [B, Tp, H, D]; k, v [B, Tp, Hkv, D].   TPU: q [B, H, Tp, D]; k, v [B, Hkv, Tp, D].
#   both: lse, delta [B, H, Tp, 1] float32.


def _gpu_params(cfg):
    return pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _tpu_params(cfg, n_arbitrary: int, n_parallel: int = 3):
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * n_parallel + ("arbitrary",) * n_arbitrary,
                                vmem_limit_bytes=cfg.vmem_limit_bytes)


def _dims(cfg, q, k):
    if cfg.platform == "gpu":
        B, Tp, H, D = q.shape
        Hkv = k.shape[2]
    else:
        B, H, Tp, D = q.shape
        Hkv = k.shape[1]
    return B, Tp, H, Hkv, D, H // Hkv


def _fwd_call(cfg: _Config, q, k, v):
    B, Tp, H, Hkv, D, r = _dims(cfg, q, k)
    bq, bk = cfg.bq, cfg.bk
    nq = Tp // bq
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, Tp, 1), F32)]
    if cfg.platform == "gpu":
        kv_spec = pl.BlockSpec((None, Tp, None, D), lambda i, b, h: (b, 0, lax.div(h, r), 0))
        q_spec = pl.BlockSpec((None, bq, None, D), lambda i, b, h: (b, i, h, 0))
        return pl.pallas_call(
            functools.partial(_gpu_fwd_kernel, cfg=cfg), out_shape=out_shape, grid=(nq, B, H),
            in_specs=[q_spec, kv_spec, kv_spec],
            out_specs=[q_spec, pl.BlockSpec((None, None, bq, 1), lambda i, b, h: (b, h, i, 0))],
            compiler_params=_gpu_params(cfg), interpret=cfg.interpret, name="window_attention_fwd",
        )(q, k, v)
    nk = _max_band(nq, bq, lambda s: _key_range(s, bq, bk, cfg))

    def kv_index(b, h, i, j):
        lo, hi = _key_range(i * bq, bq, bk, cfg)
        return (b, lax.div(h, r), jnp.minimum(lo + j, hi - 1), 0)

    q_spec = pl.BlockSpec((None, None, bq, D), lambda b, h, i, j: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, D), kv_index)
    return pl.pallas_call(
        functools.partial(_tpu_fwd_kernel, cfg=cfg, nk=nk), out_shape=out_shape, grid=(B, H, nq, nk),
        in_specs=[q_spec, kv_spec, kv_spec],
        out_specs=[q_spec, pl.BlockSpec((None, None, bq, 1), lambda b, h, i, j: (b, h, i, 0))],
        scratch_shapes=[pltpu.VMEM((bq, 1), F32), pltpu.VMEM((bq, 1), F32), pltpu.VMEM((bq, D), F32)],
        compiler_params=_tpu_params(cfg, 1), interpret=cfg.interpret, name="window_attention_fwd",
    )(q, k, v)


def _dkv_call(cfg: _Config, q, k, v, do, lse, delta):
    B, Tp, H, Hkv, D, r = _dims(cfg, q, k)
    bq, bk = cfg.bq_dkv, cfg.bk_dkv
    nk = Tp // bk
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    if cfg.platform == "gpu":
        kv_spec = pl.BlockSpec((None, bk, None, D), lambda i, b, h: (b, i, h, 0))
        qg_spec = pl.BlockSpec((None, Tp, r, D), lambda i, b, h: (b, 0, h, 0))
        st_spec = pl.BlockSpec((None, r, Tp, 1), lambda i, b, h: (b, h, 0, 0))
        return pl.pallas_call(
            functools.partial(_gpu_dkv_kernel, cfg=cfg, r=r), out_shape=out_shape, grid=(nk, B, Hkv),
            in_specs=[qg_spec, kv_spec, kv_spec, qg_spec, st_spec, st_spec], out_specs=[kv_spec, kv_spec],
            compiler_params=_gpu_params(cfg), interpret=cfg.interpret, name="window_attention_dkv",
        )(q, k, v, do, lse, delta)
    nq = _max_band(nk, bk, lambda s: _query_range(s, bq, bk, cfg))

    def q_index(b, h, kb, j, i):
        lo, hi = _query_range(kb * bk, bq, bk, cfg)
        return (b, h * r + j, jnp.maximum(jnp.minimum(lo + i, hi - 1), 0), 0)

    q_spec = pl.BlockSpec((None, None, bq, D), q_index)
    st_spec = pl.BlockSpec((None, None, bq, 1), q_index)
    kv_spec = pl.BlockSpec((None, None, bk, D), lambda b, h, kb, j, i: (b, h, kb, 0))
    return pl.pallas_call(
        functools.partial(_tpu_dkv_kernel, cfg=cfg, r=r, nq=nq), out_shape=out_shape, grid=(B, Hkv, nk, r, nq),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, st_spec, st_spec], out_specs=[kv_spec, kv_spec],
        scratch_shapes=[pltpu.VMEM((bk, D), F32), pltpu.VMEM((bk, D), F32)],
        compiler_params=_tpu_params(cfg, 2), interpret=cfg.interpret, name="window_attention_dkv",
    )(q, k, v, do, lse, delta)


def _dq_call(cfg: _Config, q, k, v, do, lse, delta):
    B, Tp, H, Hkv, D, r = _dims(cfg, q, k)
    bq, bk = cfg.bq_dq, cfg.bk_dq
    nq = Tp // bq
    out_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
    if cfg.platform == "gpu":
        kv_spec = pl.BlockSpec((None, Tp, None, D), lambda i, b, h: (b, 0, lax.div(h, r), 0))
        q_spec = pl.BlockSpec((None, bq, None, D), lambda i, b, h: (b, i, h, 0))
        st_spec = pl.BlockSpec((None, None, bq, 1), lambda i, b, h: (b, h, i, 0))
        return pl.pallas_call(
            functools.partial(_gpu_dq_kernel, cfg=cfg), out_shape=out_shape, grid=(nq, B, H),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, st_spec, st_spec], out_specs=q_spec,
            compiler_params=_gpu_params(cfg), interpret=cfg.interpret, name="window_attention_dq",
        )(q, k, v, do, lse, delta)
    nk = _max_band(nq, bq, lambda s: _key_range(s, bq, bk, cfg))

    def kv_index(b, h, i, j):
        lo, hi = _key_range(i * bq, bq, bk, cfg)
        return (b, lax.div(h, r), jnp.minimum(lo + j, hi - 1), 0)

    q_spec = pl.BlockSpec((None, None, bq, D), lambda b, h, i, j: (b, h, i, 0))
    st_spec = pl.BlockSpec((None, None, bq, 1), lambda b, h, i, j: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, D), kv_index)
    return pl.pallas_call(
        functools.partial(_tpu_dq_kernel, cfg=cfg, nk=nk), out_shape=out_shape, grid=(B, H, nq, nk),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, st_spec, st_spec], out_specs=q_spec,
        scratch_shapes=[pltpu.VMEM((bq, D), F32)],
        compiler_params=_tpu_params(cfg, 1), interpret=cfg.interpret, name="window_attention_dq",
    )(q, k, v, do, lse, delta)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention_core(cfg: _Config, q, k, v):
    return _fwd_call(cfg, q, k, v)[0]


def _attention_core_fwd(cfg, q, k, v):
    o, lse = _fwd_call(cfg, q, k, v)
    return o, (q, k, v, o, lse)


def _attention_core_bwd(cfg, res, do):
    q, k, v, o, lse = res
    do = do.astype(q.dtype)
    delta = jnp.sum(o.astype(F32) * do.astype(F32), axis=-1, keepdims=True)  # [B, T, H, 1] or [B, H, T, 1]
    if cfg.platform == "gpu":
        delta = jnp.transpose(delta, (0, 2, 1, 3))
    dk, dv = _dkv_call(cfg, q, k, v, do, lse, delta)
    dq = _dq_call(cfg, q, k, v, do, lse, delta)
    return dq, dk, dv


_attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


# --------------------------------------------------------------------------------------------------------------
# Dispatch


def _resolve_blocks(wrapper: str, block_sizes, T: int):
    if block_sizes is None:
        block_sizes = AttentionBlockSizes()
    if not isinstance(block_sizes, AttentionBlockSizes):
        raise ValueError(f"block_sizes must be an AttentionBlockSizes or None, got {type(block_sizes).__name__}")
    if block_sizes.precision not in _PRECISIONS:
        raise ValueError(f"block_sizes.precision must be one of {tuple(_PRECISIONS)}, got "
                         f"{block_sizes.precision!r}")
    defaults = AttentionBlockSizes.get_default(wrapper)
    cap = max(16, next_pow2(T))
    out = {}
    for name in _BLOCK_FIELDS:
        b = getattr(block_sizes, name)
        if b is None:
            b = getattr(defaults, name)
        elif not isinstance(b, int) or b < 16 or b & (b - 1):
            raise ValueError(f"block_sizes.{name} must be a power of two >= 16, got {b!r}")
        out[name] = min(b, cap)
    return block_sizes, out


def window_attention_pallas(q, k, v, *, scale=None, sliding_window=None, block_sizes=None, interpret=None,
                            platform=None):
    """Causal (optionally sliding-window) attention within one window with Pallas kernels.

    q [B, T, H, D]; k, v [B, T, Hkv, D] (H % Hkv == 0). Returns [B, T, H, D] in q's dtype; differentiable in
    q, k, v (custom VJP with Pallas backward kernels). platform: 'gpu'/'cuda'/'rocm' (Triton), 'tpu' (Mosaic),
    'cpu' (GPU wrapper, interpreted) or None (default backend); interpret defaults to True on a CPU-only JAX
    (a ``pltpu.InterpretParams`` selects the TPU-faithful interpreter for the TPU wrapper).
    scale must be a Python number.
    """
    attention._check_inputs(q, k, v, sliding_window)
    wrapper = resolve_platform(platform)
    interpret = resolve_interpret(interpret, wrapper, platform)
    B, T, H, D = q.shape
    try:
        scale = float(D**-0.5 if scale is None else scale)
    except TypeError as e:
        raise ValueError(f"scale must be a Python number for the Pallas kernels, got {scale!r}") from e
    block_sizes, blocks = _resolve_blocks(wrapper, block_sizes, T)
    window = None if sliding_window is None or sliding_window >= T else int(sliding_window)
    cfg = _Config(platform=wrapper, interpret=interpret, scale=scale, window=window, T=T,
                  bq=blocks["block_q"], bk=blocks["block_k"], bq_dkv=blocks["block_q_dkv"],
                  bk_dkv=blocks["block_k_dkv"], bq_dq=blocks["block_q_dq"], bk_dq=blocks["block_k_dq"],
                  num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages,
                  vmem_limit_bytes=block_sizes.vmem_limit_bytes, precision=block_sizes.precision)
    return _window_attention(cfg, -(-T // max(blocks.values())) * max(blocks.values()), q, k, v)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _window_attention(cfg: _Config, Tp: int, q, k, v):
    """Pad (T -> Tp, D -> power of two >= 16), lay out, run the custom-VJP kernels, undo."""
    T, D = q.shape[1], q.shape[3]
    Dp = max(16, next_pow2(D))
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    qp, kp, vp = (jnp.pad(x, ((0, 0), (0, Tp - T), (0, 0), (0, Dp - D))) for x in (q, k, v))
    if cfg.platform == "tpu":
        qp, kp, vp = (jnp.swapaxes(x, 1, 2) for x in (qp, kp, vp))
    o = _attention_core(cfg, qp, kp, vp)
    if cfg.platform == "tpu":
        o = jnp.swapaxes(o, 1, 2)
    return o[:, :T, :, :D]
