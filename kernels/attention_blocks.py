"""Window attention, Pallas flash kernels: configuration, block ranges and per-block math shared by the GPU
(``attention_gpu.py``) and TPU (``attention_tpu.py``) kernels.

Key blocks that are fully masked for a query block (above the diagonal, or older than the sliding window) are
skipped: ``key_range`` / ``query_range`` give the band of blocks each program visits, so a sliding-window
attention costs ~T * w, not T^2. Statistics are [bq, 1] float32 columns.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ._matmul import dot

F32 = jnp.float32
NEG = -1e30  # finite "minus infinity" for masked scores and the initial running max
PRECISIONS = {"highest": lax.Precision.HIGHEST, "default": lax.Precision.DEFAULT}

@dataclasses.dataclass(frozen=True)
class Config:
    """Static (hashable) configuration of one call, after validation."""

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
        return PRECISIONS[self.precision]



# --------------------------------------------------------------------------------------------------------------
# Block ranges (work on Python ints and on traced int32 scalars alike)


def _imin(a, b):
    return min(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.minimum(a, b)


def _imax(a, b):
    return max(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.maximum(a, b)


def _idiv(a, b: int):
    """Division of a non-negative index by a positive block size."""
    return a // b if isinstance(a, int) else lax.div(a, jnp.int32(b))


def key_range(q_start, bq: int, bk: int, cfg: Config):
    """[lo, hi) of key blocks a query block starting at q_start must visit."""
    hi = _imin(_idiv(q_start + bq - 1, bk) + 1, pl.cdiv(cfg.T, bk))
    lo = 0 if cfg.window is None else _idiv(_imax(q_start - cfg.window + 1, 0), bk)
    return lo, hi


def query_range(k_start, bq: int, bk: int, cfg: Config):
    """[lo, hi) of query blocks that see any key of the key block starting at k_start (padded rows excluded)."""
    lo = _idiv(k_start, bq)
    hi = pl.cdiv(cfg.T, bq)
    if cfg.window is not None:
        hi = _imin(_idiv(k_start + bk - 1 + cfg.window - 1, bq) + 1, hi)
    return lo, hi


def max_band(n_outer: int, b_outer: int, range_fn) -> int:
    """Largest hi - lo over the outer blocks (static Python ints): the length of the TPU inner grid axis."""
    return max(1, max(hi - lo for lo, hi in (range_fn(i * b_outer) for i in range(n_outer))))


# --------------------------------------------------------------------------------------------------------------
# Per-block math shared by both wrappers. Statistics are [bq, 1] float32 columns.


def block_mask(q_start, k_start, bq: int, bk: int, cfg: Config):
    qpos = q_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    kpos = k_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    mask = (kpos <= qpos) & (kpos < cfg.T)
    if cfg.window is not None:
        mask = mask & (qpos - kpos < cfg.window)
    return mask


def scores(q, k, mask, cfg: Config):
    s = dot("qd,kd->qk", q, k, precision=cfg.prec, accumulate=F32)
    return jnp.where(mask, s * cfg.scale, NEG)


def online_softmax_step(q, k, v, m, l, acc, mask, cfg: Config):
    s = scores(q, k, mask, cfg)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    acc = alpha * acc + dot("qk,kd->qd", p.astype(v.dtype), v, precision=cfg.prec, accumulate=F32)
    return m_new, l, acc


def finalize(m, l, acc):
    empty = l == 0.0  # only padded query rows can see no key
    o = acc / jnp.where(empty, 1.0, l)
    lse = jnp.where(empty, -NEG, m + jnp.log(jnp.where(empty, 1.0, l)))  # +1e30: exp(s - lse) = 0
    return o, lse


def probs_and_dscores(q, k, v, do, lse, delta, mask, cfg: Config):
    s = scores(q, k, mask, cfg)
    p = jnp.where(mask, jnp.exp(s - lse), 0.0)
    dp = dot("qd,kd->qk", do, v, precision=cfg.prec, accumulate=F32)
    ds = p * (dp - delta)
    return p, ds
