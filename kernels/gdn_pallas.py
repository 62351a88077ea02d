"""Pallas kernels for the chunked gated delta rule: GPU (Triton lowering) and TPU (Mosaic), forward and backward.

Entry point: :func:`gated_delta_rule_pallas` (same contract as ``gdn.gated_delta_rule``). The per-chunk math lives
in ``gdn_chunk_math.py`` and is shared; the two wrappers differ only in how chunks are walked:

* GPU (Triton): programs run in parallel, so one program owns one (batch, value head, value tile) and walks the
  chunks with a ``lax.fori_loop``; the state lives in registers. Grid (B, Hv, Dv / block_v).
* TPU (Mosaic): grid (B, Hv, Dv / block_v, chunks) with the chunk axis "arbitrary" (sequential); the state is
  carried across grid steps in a VMEM scratch buffer. The backward walks the chunk axis in reverse through the
  index maps.

Forward: the state scan is FUSED with the output computation; per-chunk states never reach HBM. Backward (through
``jax.custom_vjp``): (1) a forward pass in "states" mode recomputes the chunk-start states (the only tensor that
is written out, [B, Hv, n_chunks, Dk, Dv] float32), (2) a reverse pass over chunks carries dS, recomputes the
chunk-local quantities (decay, (I + A)^-1, W, U, V_new) and emits every gradient. dq, dk, dg and dbeta are
partial sums over value tiles (and value heads of a key-head group) and are reduced in XLA.
``backward="xla"`` swaps the backward for autodiff of the chunked XLA algorithm (debugging).

Shapes: any T (padded to the chunk with g = beta = k = 0, which leaves the state untouched); head dims are padded
with zeros to a power of two >= 16 (Triton needs powers of two and dot dims >= 16; zeros are exact no-ops).
Decoding uses ``gdn.gated_delta_rule_step`` (XLA): one token reads and writes S once, a kernel would not help.

Performance notes (unmeasured: no GPU/TPU was available while writing this). The GPU wrapper runs
B * Hv * (Dv / block_v) programs, each walking all chunks; at B=1, Hv=16, Dv=128, block_v=64 that is 32 programs
for 132 H100 SMs, and the chunk-local work ((I + A)^-1, W, U: ~20 C^3 + several C^2 D flops per chunk) sits on
that sequential path. If profiling shows it compute/latency bound, the next step is the split used by
flash-linear-attention: a chunk-parallel kernel for (I + A)^-1, W, U (written to HBM, k- and v-sized), leaving
only V_new = U - W S, the output and the state update in the sequential loop; and a chunk-parallel gradient
kernel fed by stored per-chunk dS. ``GDNBlockSizes.precision="default"`` (TF32 on GPU) speeds up the head-dim
matmuls; the decay and inverse matmuls stay exact float32.
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

from . import gdn
from ._pallas_util import next_pow2, resolve_interpret, resolve_platform
from . import gdn_chunk_math as cm

F32 = jnp.float32
PLATFORMS = ("gpu", "tpu")
BACKWARDS = ("pallas", "xla")
_PRECISIONS = {"highest": lax.Precision.HIGHEST, "default": lax.Precision.DEFAULT}


@dataclasses.dataclass(frozen=True)
class GDNBlockSizes:
    """Tiling and compiler knobs of the GDN kernels (all optional; ``None`` = platform default).

    block_v: value-dimension tile (power of two >= 16 dividing the padded Dv; on TPU also Dv itself or a
        multiple of 128). Tiles are independent programs; the chunk-local (I + A)^-1 is recomputed per tile.
    num_warps, num_warps_bwd, num_stages: Triton launch parameters (GPU only).
    vmem_limit_bytes: Mosaic scoped-VMEM limit (TPU only).
    precision: "highest" (exact float32 matmuls; default) or "default" (TF32 on GPU, bf16 passes on TPU) for
        the head-dim-sized matmuls. The decay (cumulative sum) and (I + A)^-1 matmuls are always "highest".
    """

    block_v: int | None = None
    num_warps: int = 4
    num_warps_bwd: int = 8
    num_stages: int = 1
    vmem_limit_bytes: int | None = None
    precision: str = "highest"

    @classmethod
    def get_default(cls, platform: str, head_dim_v: int) -> "GDNBlockSizes":
        return cls(block_v=_default_block_v(platform, _pad_dim(head_dim_v)))


def _pad_dim(d: int) -> int:
    return max(16, next_pow2(d))


def _default_block_v(platform: str, dv_padded: int) -> int:
    if platform == "tpu":
        return 128 if dv_padded > 128 else dv_padded
    return min(64, dv_padded)


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static (hashable) configuration of one call, after validation."""

    platform: str
    interpret: Any  # bool, or pltpu.InterpretParams (TPU wrapper)
    use_delta: bool
    scale: float
    chunk: int
    block_v: int
    num_warps: int
    num_warps_bwd: int
    num_stages: int
    vmem_limit_bytes: int | None
    precision: str
    backward: str

    @property
    def prec(self):
        return _PRECISIONS[self.precision]


# --------------------------------------------------------------------------------------------------------------
# Kernel bodies. Inputs arrive in their storage dtype and are promoted to float32 here.


def _load_chunk(q, k, v, g, beta, scale):
    return q.astype(F32) * scale, k.astype(F32), v.astype(F32), g.astype(F32), beta.astype(F32)


def _gpu_fwd_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, s0_ref, *out_refs, cfg: _Config, n: int,
                    save_states: bool):
    C = cfg.chunk

    def body(c, state):
        sl = pl.ds(pl.multiple_of(c * C, C), C)
        q, k, v, g, beta = _load_chunk(q_ref[sl, :], k_ref[sl, :], v_ref[sl, :], g_ref[sl, :], b_ref[sl, :],
                                       cfg.scale)
        if save_states:
            out_refs[0][c] = state
        o, state = cm.chunk_forward(q, k, v, g, beta, state, use_delta=cfg.use_delta, precision=cfg.prec,
                                    need_output=not save_states)
        if not save_states:
            out_refs[0][sl, :] = o.astype(out_refs[0].dtype)
        return state

    state = lax.fori_loop(0, n, body, s0_ref[...].astype(F32))
    if not save_states:
        out_refs[1][...] = state


def _gpu_bwd_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, st_ref, do_ref, dsT_ref,
                    dq_ref, dk_ref, dv_ref, dg_ref, db_ref, ds0_ref, *, cfg: _Config, n: int):
    C = cfg.chunk

    def body(i, ds):
        c = n - 1 - i
        sl = pl.ds(pl.multiple_of(c * C, C), C)
        q, k, v, g, beta = _load_chunk(q_ref[sl, :], k_ref[sl, :], v_ref[sl, :], g_ref[sl, :], b_ref[sl, :],
                                       cfg.scale)
        dq, dk, dv, dg, db, ds = cm.chunk_backward(q, k, v, g, beta, st_ref[c], do_ref[sl, :].astype(F32), ds,
                                                   use_delta=cfg.use_delta, precision=cfg.prec)
        dq_ref[sl, :] = dq
        dk_ref[sl, :] = dk
        dv_ref[sl, :] = dv.astype(dv_ref.dtype)
        dg_ref[sl, :] = dg
        db_ref[sl, :] = db
        return ds

    ds0_ref[...] = lax.fori_loop(0, n, body, dsT_ref[...].astype(F32))


def _tpu_fwd_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, s0_ref, *refs, cfg: _Config, n: int, save_states: bool):
    *out_refs, s_scr = refs
    c = pl.program_id(3)

    @pl.when(c == 0)
    def _():
        s_scr[...] = s0_ref[...].astype(F32)

    state = s_scr[...]
    if save_states:
        out_refs[0][...] = state
    q, k, v, g, beta = _load_chunk(q_ref[...], k_ref[...], v_ref[...], g_ref[...], b_ref[...], cfg.scale)
    o, state = cm.chunk_forward(q, k, v, g, beta, state, use_delta=cfg.use_delta, precision=cfg.prec,
                                need_output=not save_states)
    s_scr[...] = state
    if not save_states:
        out_refs[0][...] = o.astype(out_refs[0].dtype)

        @pl.when(c == n - 1)
        def _():
            out_refs[1][...] = state


def _tpu_bwd_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, st_ref, do_ref, dsT_ref,
                    dq_ref, dk_ref, dv_ref, dg_ref, db_ref, ds0_ref, ds_scr, *, cfg: _Config, n: int):
    i = pl.program_id(3)  # chunk n - 1 - i (reversed by the index maps)

    @pl.when(i == 0)
    def _():
        ds_scr[...] = dsT_ref[...].astype(F32)

    q, k, v, g, beta = _load_chunk(q_ref[...], k_ref[...], v_ref[...], g_ref[...], b_ref[...], cfg.scale)
    dq, dk, dv, dg, db, ds = cm.chunk_backward(q, k, v, g, beta, st_ref[...], do_ref[...].astype(F32),
                                               ds_scr[...], use_delta=cfg.use_delta, precision=cfg.prec)
    dq_ref[...] = dq
    dk_ref[...] = dk
    dv_ref[...] = dv.astype(dv_ref.dtype)
    dg_ref[...] = dg
    db_ref[...] = db
    ds_scr[...] = ds

    @pl.when(i == n - 1)
    def _():
        ds0_ref[...] = ds


# --------------------------------------------------------------------------------------------------------------
# pallas_call wrappers. Layouts (prepared by ``_prepare``):
#   GPU: q, k [B, Tp, Hk, Dk]; v, o [B, Tp, Hv, Dv]      (the model's layout: no transposes)
#   TPU: q, k [B, Hk, Tp, Dk]; v, o [B, Hv, Tp, Dv]      (time second-minor: (8, 128) block rule)
#   both: g, beta [B, Hv, Tp, 1] (per-token scalars as columns); states [B, Hv, Dk, Dv] float32.


def _compiler_params(cfg: _Config, backward: bool):
    if cfg.platform == "gpu":
        return pltriton.CompilerParams(num_warps=cfg.num_warps_bwd if backward else cfg.num_warps,
                                       num_stages=cfg.num_stages)
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
                                vmem_limit_bytes=cfg.vmem_limit_bytes)


def _dims(cfg: _Config, q, v):
    if cfg.platform == "gpu":
        B, Tp, Hk, Dk = q.shape
        Hv, Dv = v.shape[2], v.shape[3]
    else:
        B, Hk, Tp, Dk = q.shape
        Hv, Dv = v.shape[1], v.shape[3]
    return B, Tp, Hk, Hv, Dk, Dv, Hv // Hk, Tp // cfg.chunk, Dv // cfg.block_v


def _forward_call(cfg: _Config, q, k, v, g, beta, s0, *, save_states: bool):
    B, Tp, Hk, Hv, Dk, Dv, r, n, nv = _dims(cfg, q, v)
    C, bv = cfg.chunk, cfg.block_v
    if cfg.platform == "gpu":
        grid = (B, Hv, nv)
        in_specs = [
            pl.BlockSpec((None, Tp, None, Dk), lambda b, h, j: (b, 0, lax.div(h, r), 0)),
            pl.BlockSpec((None, Tp, None, Dk), lambda b, h, j: (b, 0, lax.div(h, r), 0)),
            pl.BlockSpec((None, Tp, None, bv), lambda b, h, j: (b, 0, h, j)),
            pl.BlockSpec((None, None, Tp, 1), lambda b, h, j: (b, h, 0, 0)),
            pl.BlockSpec((None, None, Tp, 1), lambda b, h, j: (b, h, 0, 0)),
            pl.BlockSpec((None, None, Dk, bv), lambda b, h, j: (b, h, 0, j)),
        ]
        state_spec = pl.BlockSpec((None, None, Dk, bv), lambda b, h, j: (b, h, 0, j))
        if save_states:
            out_shape = [jax.ShapeDtypeStruct((B, Hv, n, Dk, Dv), F32)]
            out_specs = [pl.BlockSpec((None, None, n, Dk, bv), lambda b, h, j: (b, h, 0, 0, j))]
        else:
            out_shape = [jax.ShapeDtypeStruct(v.shape, q.dtype), jax.ShapeDtypeStruct(s0.shape, F32)]
            out_specs = [pl.BlockSpec((None, Tp, None, bv), lambda b, h, j: (b, 0, h, j)), state_spec]
        kernel = functools.partial(_gpu_fwd_kernel, cfg=cfg, n=n, save_states=save_states)
        scratch = ()
    else:
        grid = (B, Hv, nv, n)
        in_specs = [
            pl.BlockSpec((None, None, C, Dk), lambda b, h, j, c: (b, lax.div(h, r), c, 0)),
            pl.BlockSpec((None, None, C, Dk), lambda b, h, j, c: (b, lax.div(h, r), c, 0)),
            pl.BlockSpec((None, None, C, bv), lambda b, h, j, c: (b, h, c, j)),
            pl.BlockSpec((None, None, C, 1), lambda b, h, j, c: (b, h, c, 0)),
            pl.BlockSpec((None, None, C, 1), lambda b, h, j, c: (b, h, c, 0)),
            pl.BlockSpec((None, None, Dk, bv), lambda b, h, j, c: (b, h, 0, j)),
        ]
        if save_states:
            out_shape = [jax.ShapeDtypeStruct((B, Hv, n, Dk, Dv), F32)]
            out_specs = [pl.BlockSpec((None, None, None, Dk, bv), lambda b, h, j, c: (b, h, c, 0, j))]
        else:
            out_shape = [jax.ShapeDtypeStruct(v.shape, q.dtype), jax.ShapeDtypeStruct(s0.shape, F32)]
            out_specs = [pl.BlockSpec((None, None, C, bv), lambda b, h, j, c: (b, h, c, j)),
                         pl.BlockSpec((None, None, Dk, bv), lambda b, h, j, c: (b, h, 0, j))]
        kernel = functools.partial(_tpu_fwd_kernel, cfg=cfg, n=n, save_states=save_states)
        scratch = (pltpu.VMEM((Dk, bv), F32),)
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=scratch,
        compiler_params=_compiler_params(cfg, backward=False),
        interpret=cfg.interpret,
        name="gdn_chunk_states" if save_states else "gdn_chunk_fwd",
    )(q, k, v, g, beta, s0)


def _backward_call(cfg: _Config, q, k, v, g, beta, states, do, dsT):
    B, Tp, Hk, Hv, Dk, Dv, r, n, nv = _dims(cfg, q, v)
    C, bv = cfg.chunk, cfg.block_v
    if cfg.platform == "gpu":
        grid = (B, Hv, nv)
        qk_spec = pl.BlockSpec((None, Tp, None, Dk), lambda b, h, j: (b, 0, lax.div(h, r), 0))
        v_spec = pl.BlockSpec((None, Tp, None, bv), lambda b, h, j: (b, 0, h, j))
        col_spec = pl.BlockSpec((None, None, Tp, 1), lambda b, h, j: (b, h, 0, 0))
        s_spec = pl.BlockSpec((None, None, Dk, bv), lambda b, h, j: (b, h, 0, j))
        in_specs = [qk_spec, qk_spec, v_spec, col_spec, col_spec,
                    pl.BlockSpec((None, None, n, Dk, bv), lambda b, h, j: (b, h, 0, 0, j)), v_spec, s_spec]
        part_qk = pl.BlockSpec((None, None, Tp, None, Dk), lambda b, h, j: (j, b, 0, h, 0))
        part_col = pl.BlockSpec((None, None, None, Tp, 1), lambda b, h, j: (j, b, h, 0, 0))
        out_specs = [part_qk, part_qk, v_spec, part_col, part_col, s_spec]
        part_qk_shape = (nv, B, Tp, Hv, Dk)
        kernel = functools.partial(_gpu_bwd_kernel, cfg=cfg, n=n)
        scratch = ()
    else:
        grid = (B, Hv, nv, n)
        rev = lambda i: n - 1 - i  # noqa: E731
        qk_spec = pl.BlockSpec((None, None, C, Dk), lambda b, h, j, i: (b, lax.div(h, r), rev(i), 0))
        v_spec = pl.BlockSpec((None, None, C, bv), lambda b, h, j, i: (b, h, rev(i), j))
        col_spec = pl.BlockSpec((None, None, C, 1), lambda b, h, j, i: (b, h, rev(i), 0))
        s_spec = pl.BlockSpec((None, None, Dk, bv), lambda b, h, j, i: (b, h, 0, j))
        in_specs = [qk_spec, qk_spec, v_spec, col_spec, col_spec,
                    pl.BlockSpec((None, None, None, Dk, bv), lambda b, h, j, i: (b, h, rev(i), 0, j)),
                    v_spec, s_spec]
        part_qk = pl.BlockSpec((None, None, None, C, Dk), lambda b, h, j, i: (j, b, h, rev(i), 0))
        part_col = pl.BlockSpec((None, None, None, C, 1), lambda b, h, j, i: (j, b, h, rev(i), 0))
        out_specs = [part_qk, part_qk, v_spec, part_col, part_col, s_spec]
        part_qk_shape = (nv, B, Hv, Tp, Dk)
        kernel = functools.partial(_tpu_bwd_kernel, cfg=cfg, n=n)
        scratch = (pltpu.VMEM((Dk, bv), F32),)
    out_shape = [
        jax.ShapeDtypeStruct(part_qk_shape, F32),
        jax.ShapeDtypeStruct(part_qk_shape, F32),
        jax.ShapeDtypeStruct(v.shape, v.dtype),
        jax.ShapeDtypeStruct((nv, B, Hv, Tp, 1), F32),
        jax.ShapeDtypeStruct((nv, B, Hv, Tp, 1), F32),
        jax.ShapeDtypeStruct((B, Hv, Dk, Dv), F32),
    ]
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=scratch,
        compiler_params=_compiler_params(cfg, backward=True),
        interpret=cfg.interpret,
        name="gdn_chunk_bwd",
    )(q, k, v, g, beta, states, do, dsT)


# --------------------------------------------------------------------------------------------------------------
# custom_vjp over prepared (padded, laid out) arrays


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gdn_core(cfg: _Config, q, k, v, g, beta, s0):
    o, sT = _forward_call(cfg, q, k, v, g, beta, s0, save_states=False)
    return o, sT


def _gdn_core_fwd(cfg, q, k, v, g, beta, s0):
    return _gdn_core(cfg, q, k, v, g, beta, s0), (q, k, v, g, beta, s0)


def _xla_reference_on_prepared(cfg: _Config, q, k, v, g, beta, s0):
    """The chunked XLA algorithm on the kernel's prepared layout (for the ``backward="xla"`` fallback)."""
    if cfg.platform == "tpu":
        q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    g2, b2 = (jnp.swapaxes(x[..., 0], 1, 2) for x in (g, beta))
    o, sT = gdn.chunked_gated_delta_rule(q, k, v, g2, b2, s0, scale=cfg.scale, use_delta=cfg.use_delta,
                                         chunk_size=cfg.chunk)
    if cfg.platform == "tpu":
        o = jnp.swapaxes(o, 1, 2)
    return o, sT


def _gdn_core_bwd(cfg, res, cotangents):
    q, k, v, g, beta, s0 = res
    do, dsT = cotangents
    if cfg.backward == "xla":
        _, vjp = jax.vjp(functools.partial(_xla_reference_on_prepared, cfg), q, k, v, g, beta, s0)
        return vjp((do.astype(q.dtype), dsT.astype(F32)))
    (states,) = _forward_call(cfg, q, k, v, g, beta, s0, save_states=True)
    dq, dk, dv, dg, db, ds0 = _backward_call(cfg, q, k, v, g, beta, states, do.astype(q.dtype), dsT.astype(F32))
    B, Tp, Hk, Hv, Dk, Dv, r, n, nv = _dims(cfg, q, v)
    dq, dk, dg, db = (x.sum(axis=0) for x in (dq, dk, dg, db))
    if cfg.platform == "gpu":  # [B, Tp, Hv, Dk] -> [B, Tp, Hk, Dk]
        dq, dk = (x.reshape(B, Tp, Hk, r, Dk).sum(axis=3) for x in (dq, dk))
    else:  # [B, Hv, Tp, Dk] -> [B, Hk, Tp, Dk]
        dq, dk = (x.reshape(B, Hk, r, Tp, Dk).sum(axis=2) for x in (dq, dk))
    dq = dq * cfg.scale
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg.astype(g.dtype),
            db.astype(beta.dtype), ds0.astype(s0.dtype))


_gdn_core.defvjp(_gdn_core_fwd, _gdn_core_bwd)


# --------------------------------------------------------------------------------------------------------------
# Dispatch


def kernel_chunk_size(chunk_size: int) -> int:
    """The chunk the kernels use for a requested chunk_size (any multiple of 16, as for the XLA path): the
    largest power of two <= min(chunk_size, 128) (Triton tiles are powers of two; the result does not depend on
    the chunk, only the speed does)."""
    return min(128, 1 << (int(chunk_size).bit_length() - 1))


def _validate(platform, chunk_size, block_sizes, dv_padded, backward):
    if not isinstance(chunk_size, int) or chunk_size < 16 or chunk_size % 16:
        raise ValueError(f"chunk_size must be a positive multiple of 16, got {chunk_size!r}")
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
    if block_sizes is None:
        block_sizes = GDNBlockSizes()
    if not isinstance(block_sizes, GDNBlockSizes):
        raise ValueError(f"block_sizes must be a GDNBlockSizes or None, got {type(block_sizes).__name__}")
    if block_sizes.precision not in _PRECISIONS:
        raise ValueError(f"block_sizes.precision must be one of {tuple(_PRECISIONS)}, got "
                         f"{block_sizes.precision!r}")
    bv = block_sizes.block_v or _default_block_v(platform, dv_padded)
    if bv < 16 or bv & (bv - 1) or dv_padded % bv:
        raise ValueError(f"block_sizes.block_v must be a power of two >= 16 dividing the padded value head dim "
                         f"({dv_padded}), got {bv}")
    if platform == "tpu" and bv != dv_padded and bv % 128:
        raise ValueError(f"block_sizes.block_v on TPU must equal the padded value head dim ({dv_padded}) or be a "
                         f"multiple of 128, got {bv}")
    return block_sizes, bv


def gated_delta_rule_pallas(q, k, v, g, beta, initial_state=None, *, scale=None, use_delta=True, chunk_size=64,
                            block_sizes=None, interpret=None, platform=None, backward="pallas"):
    """Gated delta rule with Pallas kernels; contract of ``gdn.gated_delta_rule``.

    q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; g, beta [B, T, Hv]; initial_state [B, Hv, Dk, Dv] or None.
    Returns (o [B, T, Hv, Dv] in q's dtype, final_state [B, Hv, Dk, Dv] float32). Differentiable in every array
    argument (custom VJP with Pallas backward kernels; ``backward="xla"`` uses autodiff of the chunked XLA path).

    platform: 'gpu'/'cuda'/'rocm' (Triton wrapper), 'tpu' (Mosaic wrapper), 'cpu' (the GPU wrapper, interpreted)
    or None (the default backend). interpret: run the kernels in Pallas interpret mode (default: True on a
    CPU-only JAX, else False; a ``pltpu.InterpretParams`` selects the TPU-faithful interpreter). chunk_size: a multiple of 16; the kernels use ``kernel_chunk_size(chunk_size)``
    (a power of two <= 128), and short sequences a smaller power-of-two chunk. scale must be a Python number
    (it is baked into the kernel). block_sizes: ``GDNBlockSizes`` or None (platform defaults).
    """
    B, T, Hk, Hv, Dk, Dv = gdn._check_inputs(q, k, v, g, beta, initial_state)
    wrapper = resolve_platform(platform)
    interpret = resolve_interpret(interpret, wrapper, platform)
    block_sizes, bv = _validate(wrapper, chunk_size, block_sizes, _pad_dim(Dv), backward)
    try:
        scale = float(Dk**-0.5 if scale is None else scale)
    except TypeError as e:
        raise ValueError(f"scale must be a Python number for the Pallas kernels, got {scale!r}") from e
    C = min(kernel_chunk_size(chunk_size), max(16, next_pow2(T)))
    cfg = _Config(platform=wrapper, interpret=interpret, use_delta=bool(use_delta), scale=scale, chunk=C,
                  block_v=bv, num_warps=block_sizes.num_warps, num_warps_bwd=block_sizes.num_warps_bwd,
                  num_stages=block_sizes.num_stages, vmem_limit_bytes=block_sizes.vmem_limit_bytes,
                  precision=block_sizes.precision, backward=backward)
    return _gated_delta_rule(cfg, q, k, v, g, beta, initial_state)


@functools.partial(jax.jit, static_argnums=(0,))
def _gated_delta_rule(cfg: _Config, q, k, v, g, beta, initial_state):
    """Pad (T -> chunks, head dims -> powers of two >= 16), lay out, run the custom-VJP kernels, undo."""
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[2], v.shape[3]
    Dkp, Dvp = _pad_dim(Dk), _pad_dim(Dv)
    Tp = -(-T // cfg.chunk) * cfg.chunk
    wrapper = cfg.platform

    def pad(x, d):  # [B, T, H, D] -> [B, Tp, H, d]
        return jnp.pad(x, ((0, 0), (0, Tp - T), (0, 0), (0, d - x.shape[-1])))

    qp, kp, vp = pad(q, Dkp), pad(k.astype(q.dtype), Dkp), pad(v.astype(q.dtype), Dvp)
    if wrapper == "tpu":
        qp, kp, vp = (jnp.swapaxes(x, 1, 2) for x in (qp, kp, vp))
    # g, beta: [B, T, Hv] -> [B, Hv, Tp, 1]; padded tokens get g = beta = 0 (with k = 0: state untouched)
    gp, bp = (jnp.pad(jnp.swapaxes(x.astype(F32), 1, 2), ((0, 0), (0, 0), (0, Tp - T)))[..., None]
              for x in (g, beta))
    if initial_state is None:
        s0 = jnp.zeros((B, Hv, Dkp, Dvp), F32)
    else:
        s0 = jnp.pad(initial_state.astype(F32), ((0, 0), (0, 0), (0, Dkp - Dk), (0, Dvp - Dv)))
    o, sT = _gdn_core(cfg, qp, kp, vp, gp, bp, s0)
    if wrapper == "tpu":
        o = jnp.swapaxes(o, 1, 2)
    return o[:, :T, :, :Dv], sT[:, :, :Dk, :Dv]
