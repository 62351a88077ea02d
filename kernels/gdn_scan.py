"""The only sequential part of the chunked gated delta rule: the state scan over chunks, forward and reverse.

Per chunk c (all (batch, head) pairs at once), with the chunk-local quantities W, U, Kdec and the chunk's log
decays g from the chunk-parallel stages (``gdn_chunked.py``):
    states[c] = S                                   (the state at the chunk start, stored in the operand dtype)
    V_new     = U - W S                             (use_delta=False: V_new = U, no W)
    S        <- exp(sum g) S + Kdec^T V_new         (two matmuls; S stays float32)
Reverse (``jax.custom_vjp``), X = cotangent of the state at the chunk END, starting from d(final state):
    dh[c] = X;  dV_new = d(V_new)[c] + Kdec X;  X <- exp(sum g) X + d(states)[c] - W^T dV_new
and then, chunk-parallel in XLA: dU = dV_new, dW = -dV_new states^T, dKdec = V_new dh^T,
dg = exp(sum g) <states, dh> for every token of the chunk. The reverse also has two matmuls per chunk.

Implementations (``ScanConfig.impl`` / ``.backward``): "xla" (``lax.scan``; arrays chunk-major
[n, B, H, C, D]) and "pallas" (``gdn_scan_gpu`` Triton / ``gdn_scan_tpu`` Mosaic kernels; arrays head-major
[B, H, n, C, D], reshaped for free to [B, H, n*C, D]). ``backward="xla"`` with ``impl="pallas"`` swaps only the
reverse kernel for the ``lax.scan`` (debugging).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from . import _matmul, gdn_scan_gpu, gdn_scan_tpu
from ._pallas_util import pad_dim

F32 = jnp.float32
IMPLS = ("xla", "pallas")


@dataclasses.dataclass(frozen=True)
class ScanConfig:
    """Static configuration of the state scan (hashable: a jit static argument)."""

    impl: str = "xla"
    backward: str = "xla"
    use_delta: bool = True
    platform: str = "gpu"       # Pallas wrapper: "gpu" (Triton) or "tpu" (Mosaic)
    interpret: Any = False      # bool, or pltpu.InterpretParams (TPU wrapper)
    block_v: int = 32           # value tile of the Pallas kernels (a power of two dividing the padded Dv)
    num_warps: int = 4
    num_stages: int = 1
    vmem_limit_bytes: int | None = None

    @property
    def chunk_axis(self) -> int:
        """Where the chunk axis sits in this implementation's layout."""
        return 0 if self.impl == "xla" else 2


def _gate(g):
    """exp(sum of a chunk's log decays) [..., C] -> [..., 1, 1]: the state's decay over the chunk."""
    return jnp.exp(jnp.sum(g, axis=-1))[..., None, None]


# --------------------------------------------------------------------------------------------------------------
# XLA (lax.scan) loops, chunk-major arrays.


def _xla_forward(use_delta, w, u, kdec, g, s0):
    op = u.dtype

    def body(S, xs):
        w_c, u_c, kd_c, g_c = xs
        S_op = S.astype(op)
        if use_delta:
            vn = (u_c.astype(S.dtype) - _matmul.dot("...ck,...kv->...cv", w_c, S_op, op)).astype(op)
        else:
            vn = u_c
        S = _gate(g_c).astype(S.dtype) * S + _matmul.dot("...ck,...cv->...kv", kd_c, vn, op).astype(S.dtype)
        return S, (S_op, vn)

    w_or_zeros = w if use_delta else jnp.zeros((u.shape[0],), op)  # lax.scan needs an array per chunk
    sT, (states, v_new) = jax.lax.scan(body, s0, (w_or_zeros, u, kdec, g))
    return states, v_new, sT


def _xla_reverse(use_delta, w, kdec, g, d_states, d_vnew, d_sT):
    op = kdec.dtype
    acc = d_sT.dtype

    def body(X, xs):
        w_c, kd_c, g_c, dst_c, dvn_c = xs
        X_op = X.astype(op)
        dvn = (dvn_c.astype(acc) + _matmul.dot("...ck,...kv->...cv", kd_c, X_op, op).astype(acc)).astype(op)
        X_new = _gate(g_c).astype(acc) * X + dst_c.astype(acc)
        if use_delta:
            X_new = X_new - _matmul.dot("...ck,...cv->...kv", w_c, dvn, op).astype(acc)
        return X_new, (X_op, dvn)

    w_or_zeros = w if use_delta else jnp.zeros((kdec.shape[0],), op)
    ds0, (dh, dvn) = jax.lax.scan(body, d_sT, (w_or_zeros, kdec, g, d_states, d_vnew), reverse=True)
    return dh, dvn, ds0


# --------------------------------------------------------------------------------------------------------------
# Pallas, head-major arrays [B, H, n, C, D]: flatten chunks into time, pad head dims, call the platform's kernels.


def _pad_last(x, d: int):
    return x if x.shape[-1] == d else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, d - x.shape[-1])])


def _pad_state(s, dk: int, dv: int):
    return jnp.pad(s, [(0, 0)] * (s.ndim - 2) + [(0, dk - s.shape[-2]), (0, dv - s.shape[-1])])


def _kernels(cfg: ScanConfig):
    return gdn_scan_tpu if cfg.platform == "tpu" else gdn_scan_gpu


def _pallas_forward(cfg: ScanConfig, w, u, kdec, g, s0):
    B, H, n, C, Dk = kdec.shape
    Dv = u.shape[-1]
    Dkp, Dvp = pad_dim(Dk), pad_dim(Dv)
    flat = lambda x, d: _pad_last(x.reshape(B, H, n * C, x.shape[-1]), d)  # noqa: E731
    states, v_new, sT = _kernels(cfg).forward(
        None if w is None else flat(w, Dkp), flat(u, Dvp), flat(kdec, Dkp), g.reshape(B, H, n * C, 1).astype(F32),
        _pad_state(s0.astype(F32), Dkp, Dvp), cfg=cfg, chunk=C)
    states = states[..., :Dk, :Dv]
    v_new = u if v_new is None else v_new[..., :Dv].reshape(u.shape)
    return states, v_new, sT[..., :Dk, :Dv]


def _pallas_reverse(cfg: ScanConfig, w, kdec, g, d_states, d_vnew, d_sT):
    B, H, n, C, Dk = kdec.shape
    Dv = d_vnew.shape[-1]
    Dkp, Dvp = pad_dim(Dk), pad_dim(Dv)
    flat = lambda x, d: _pad_last(x.reshape(B, H, n * C, x.shape[-1]), d)  # noqa: E731
    dh, dvn, ds0 = _kernels(cfg).reverse(
        None if w is None else flat(w, Dkp), flat(kdec, Dkp), g.reshape(B, H, n * C, 1).astype(F32),
        _pad_state(d_states, Dkp, Dvp), flat(d_vnew, Dvp), _pad_state(d_sT.astype(F32), Dkp, Dvp), cfg=cfg,
        chunk=C)
    return dh[..., :Dk, :Dv], dvn[..., :Dv].reshape(d_vnew.shape), ds0[..., :Dk, :Dv]


def _to_chunk_major(x):
    return None if x is None else jnp.moveaxis(x, 2, 0)


def _from_chunk_major(x):
    return jnp.moveaxis(x, 0, 2)


def _forward(cfg: ScanConfig, w, u, kdec, g, s0):
    if cfg.impl == "xla":
        return _xla_forward(cfg.use_delta, w, u, kdec, g, s0)
    return _pallas_forward(cfg, w, u, kdec, g, s0)


def _reverse(cfg: ScanConfig, w, kdec, g, d_states, d_vnew, d_sT):
    if cfg.impl == "pallas" and cfg.backward == "pallas":
        return _pallas_reverse(cfg, w, kdec, g, d_states, d_vnew, d_sT)
    if cfg.impl == "xla":
        return _xla_reverse(cfg.use_delta, w, kdec, g, d_states, d_vnew, d_sT)
    dh, dvn, ds0 = _xla_reverse(cfg.use_delta, *map(_to_chunk_major, (w, kdec, g, d_states, d_vnew)), d_sT)
    return _from_chunk_major(dh), _from_chunk_major(dvn), ds0


# --------------------------------------------------------------------------------------------------------------
# custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def state_scan(cfg: ScanConfig, w, u, kdec, g, s0):
    """The state scan. w (None when use_delta=False), kdec [..., C, Dk] and u [..., C, Dv] in the operand dtype;
    g [..., C] log decays (float32); s0 [B, H, Dk, Dv] float32 (float64 in the tests' oracle); leading dims
    [n, B, H] (impl "xla") or [B, H, n] (impl "pallas").
    Returns (states [..., Dk, Dv] operand dtype, v_new [..., C, Dv] operand dtype, final state like s0)."""
    return _forward(cfg, w, u, kdec, g, s0)


def _state_scan_fwd(cfg, w, u, kdec, g, s0):
    states, v_new, sT = _forward(cfg, w, u, kdec, g, s0)
    return (states, v_new, sT), (w, kdec, g, states, v_new, jnp.zeros((0,), u.dtype))


def _state_scan_bwd(cfg, res, cotangents):
    w, kdec, g, states, v_new, u_tag = res
    d_states, d_vnew, d_sT = cotangents
    op = kdec.dtype
    dh, dvn, ds0 = _reverse(cfg, w, kdec, g, d_states.astype(op), d_vnew.astype(op), d_sT)
    # Everything else is chunk-parallel.
    acc = ds0.dtype
    dlog_gate = _gate(g)[..., 0, 0].astype(acc) * jnp.sum(states.astype(acc) * dh.astype(acc), axis=(-2, -1))
    dg = jnp.broadcast_to(dlog_gate[..., None], g.shape).astype(g.dtype)
    dkdec = _matmul.dot("...cv,...kv->...ck", v_new, dh, op).astype(kdec.dtype)
    dw = None if w is None else (-_matmul.dot("...cv,...kv->...ck", dvn, states, op)).astype(w.dtype)
    return dw, dvn.astype(u_tag.dtype), dkdec, dg, ds0


state_scan.defvjp(_state_scan_fwd, _state_scan_bwd)
