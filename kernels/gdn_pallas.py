"""The gated delta rule with its state scan in Pallas: GPU (Triton lowering) and TPU (Mosaic).

The chunk-parallel stages (gate cumsum, K K^T, (I + A)^-1, W, U, the output) are batched XLA
(``gdn_chunked.py``); only the sequential state scan and its reverse are Pallas kernels (``gdn_scan_gpu.py``,
``gdn_scan_tpu.py``: two matmuls per chunk each, so they compile in seconds). The custom VJP of the scan runs
the reverse kernel for dS and everything else chunk-parallel; ``backward="xla"`` swaps the reverse kernel for a
``lax.scan`` (debugging).
"""

from __future__ import annotations

import dataclasses

from . import _checks
from ._pallas_util import pad_dim, resolve_interpret, triton_available
from .backends import platform_kind
from .gdn_chunked import chunked_gated_delta_rule
from .gdn_scan import ScanConfig

BACKWARDS = ("pallas", "xla")


@dataclasses.dataclass(frozen=True)
class GDNBlockSizes:
    """Tiling and compiler knobs of the state-scan kernels (``None`` = platform default).

    block_v: value-dimension tile: one program (GPU) or grid column (TPU) per tile; a power of two >= 16
        dividing the padded Dv; on TPU also Dv itself or a multiple of 128. Default: 32 on GPU (more programs
        for the SMs), min(Dv, 128) on TPU.
    num_warps, num_stages: Triton launch parameters (GPU only).
    vmem_limit_bytes: Mosaic scoped-VMEM limit (TPU only).
    """

    block_v: int | None = None
    num_warps: int = 4
    num_stages: int = 1
    vmem_limit_bytes: int | None = None

    @classmethod
    def get_default(cls, platform: str, head_dim_v: int) -> "GDNBlockSizes":
        return cls(block_v=default_block_v(platform, pad_dim(head_dim_v)))


def default_block_v(platform: str, dv_padded: int) -> int:
    if platform == "tpu":
        return min(128, dv_padded)
    return min(32, dv_padded)


def kernel_chunk_size(chunk_size: int) -> int:
    """The chunk the kernels use for a requested chunk_size (any multiple of 16, as for the XLA path): the
    largest power of two <= min(chunk_size, 128) (Triton tiles are powers of two; the result does not depend on
    the chunk, only the speed does)."""
    return min(128, 1 << (int(chunk_size).bit_length() - 1))


def _block_v(platform: str, block_sizes, dv_padded: int) -> int:
    if not isinstance(block_sizes, GDNBlockSizes):
        raise ValueError(f"block_sizes must be a GDNBlockSizes or None, got {type(block_sizes).__name__}")
    bv = block_sizes.block_v or default_block_v(platform, dv_padded)
    if not isinstance(bv, int) or bv < 16 or bv & (bv - 1) or dv_padded % bv:
        raise ValueError(f"block_sizes.block_v must be a power of two >= 16 dividing the padded value head dim "
                         f"({dv_padded}), got {bv!r}")
    if platform == "tpu" and bv != dv_padded and bv % 128:
        raise ValueError(f"block_sizes.block_v on TPU must equal the padded value head dim ({dv_padded}) or be a "
                         f"multiple of 128, got {bv}")
    return bv


def scan_config(*, use_delta: bool, value_head_dim: int, block_sizes=None, interpret=None, platform=None,
                backward="pallas") -> ScanConfig:
    """The validated Pallas ``ScanConfig`` for one call."""
    _checks.require_choice("backward", backward, BACKWARDS)
    wrapper = "tpu" if platform_kind(platform) == "tpu" else "gpu"  # CPU interprets the GPU kernels
    interpret = resolve_interpret(interpret, wrapper, platform)
    block_sizes = GDNBlockSizes() if block_sizes is None else block_sizes
    bv = _block_v(wrapper, block_sizes, pad_dim(value_head_dim))
    if wrapper == "gpu" and interpret is False and not triton_available():
        raise RuntimeError("gated_delta_rule(backend='pallas') on GPU needs the Pallas Triton lowering, which this "
                           "JAX lacks; use backend='chunked' (or 'auto')")
    return ScanConfig(impl="pallas", backward=backward, use_delta=bool(use_delta), platform=wrapper,
                      interpret=interpret, block_v=bv, num_warps=block_sizes.num_warps,
                      num_stages=block_sizes.num_stages, vmem_limit_bytes=block_sizes.vmem_limit_bytes)


def gated_delta_rule_pallas(q, k, v, g, beta, initial_state=None, *, scale=None, use_delta=True, chunk_size=64,
                            block_sizes=None, interpret=None, platform=None, backward="pallas"):
    """Gated delta rule with the Pallas state scan; contract of ``gdn.gated_delta_rule``.

    q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; g, beta [B, T, Hv]; initial_state [B, Hv, Dk, Dv] or None.
    Returns (o [B, T, Hv, Dv] in q's dtype, final_state [B, Hv, Dk, Dv] float32), differentiable in every array.

    platform: 'gpu'/'cuda'/'rocm' (Triton), 'tpu' (Mosaic), 'cpu' (the GPU kernels, interpreted) or None (the
    default backend). interpret: Pallas interpret mode (default: True on a CPU-only JAX; a
    ``pltpu.InterpretParams`` selects the TPU-faithful interpreter). chunk_size: a multiple of 16; the kernels use
    ``kernel_chunk_size(chunk_size)``, short sequences a smaller power of two. block_sizes: ``GDNBlockSizes``.
    Float64 inputs run in float32 (Pallas has no float64).
    """
    _checks.check_chunk_size(chunk_size)
    _checks.check_gdn_inputs(q, k, v, g, beta, initial_state)
    cfg = scan_config(use_delta=use_delta, value_head_dim=v.shape[-1], block_sizes=block_sizes,
                      interpret=interpret, platform=platform, backward=backward)
    q, k, v, g, beta = (x.astype("float32") if x.dtype == "float64" else x for x in (q, k, v, g, beta))
    if initial_state is not None and initial_state.dtype == "float64":
        initial_state = initial_state.astype("float32")
    return chunked_gated_delta_rule(q, k, v, g, beta, initial_state, scale=scale, use_delta=use_delta,
                                    chunk_size=kernel_chunk_size(chunk_size), scan=cfg)
