"""Pallas flash attention for window-local causal attention: GPU (Triton lowering) and TPU (Mosaic).

Entry point: :func:`window_attention_pallas` (same contract as ``attention.window_attention``). Online softmax with
float32 statistics (running max m, normaliser l, accumulator), causal within the window, optional sliding window
(query i sees keys i - w + 1 ... i), grouped KV heads (query head h reads KV head h // (H / Hkv)). Fully masked
blocks are skipped (``attention_blocks.key_range`` / ``query_range``): the cost grows with T * w, not T^2.

Backward (``jax.custom_vjp``): delta = rowsum(dO * O) in XLA, then a dK/dV kernel (one program per key block and
KV head, accumulating over the query heads of its group and the valid query blocks) and a dQ kernel. The forward
saves the log-sum-exp (float32, [B, H, T, 1]) for the backward. The kernels themselves are in
``attention_gpu.py`` (GPU reads the model's [B, T, H, D] layout directly) and ``attention_tpu.py`` (TPU gets
[B, H, T, D]: time second-minor). T is padded to the block size and D to a power of two >= 16 with zeros (exact:
padded keys are masked, padded dims add 0 to q.k). ``backward="xla"`` keeps the forward kernel and swaps the
backward kernels for XLA autodiff of ``attention_xla.xla_window_attention`` (recomputed from q, k, v), as
``gdn_pallas``'s ``backward="xla"`` does for the GDN reverse scan (debugging, or where the backward kernels fail).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from . import _checks, attention_gpu, attention_tpu
from ._pallas_util import next_pow2, pad_dim, resolve_interpret, triton_available
from .attention_blocks import F32, PRECISIONS, Config
from .attention_xla import xla_window_attention
from .backends import platform_kind

BACKWARDS = ("pallas", "xla")


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


def _kernels(cfg: Config):
    return attention_tpu if cfg.platform == "tpu" else attention_gpu


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention_core(cfg: Config, q, k, v):
    return _kernels(cfg).forward(cfg, q, k, v)[0]


def _attention_core_fwd(cfg, q, k, v):
    o, lse = _kernels(cfg).forward(cfg, q, k, v)
    return o, (q, k, v, o, lse)


def _attention_core_bwd(cfg, res, do):
    q, k, v, o, lse = res
    do = do.astype(q.dtype)
    delta = jnp.sum(o.astype(F32) * do.astype(F32), axis=-1, keepdims=True)  # [B, T, H, 1] or [B, H, T, 1]
    if cfg.platform == "gpu":
        delta = jnp.transpose(delta, (0, 2, 1, 3))
    dk, dv = _kernels(cfg).dkv(cfg, q, k, v, do, lse, delta)
    dq = _kernels(cfg).dq(cfg, q, k, v, do, lse, delta)
    return dq, dk, dv


_attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


def _resolve_blocks(wrapper: str, block_sizes, T: int):
    if block_sizes is None:
        block_sizes = AttentionBlockSizes()
    if not isinstance(block_sizes, AttentionBlockSizes):
        raise ValueError(f"block_sizes must be an AttentionBlockSizes or None, got {type(block_sizes).__name__}")
    if block_sizes.precision not in PRECISIONS:
        raise ValueError(f"block_sizes.precision must be one of {tuple(PRECISIONS)}, got "
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
                            platform=None, backward="pallas"):
    """Causal (optionally sliding-window) attention within one window with Pallas kernels.

    q [B, T, H, D]; k, v [B, T, Hkv, D] (H % Hkv == 0). Returns [B, T, H, D] in q's dtype; differentiable in
    q, k, v (custom VJP). platform: 'gpu'/'cuda'/'rocm' (Triton), 'tpu' (Mosaic), 'cpu' (GPU wrapper,
    interpreted) or None (default backend); interpret defaults to True on a CPU-only JAX (a
    ``pltpu.InterpretParams`` selects the TPU-faithful interpreter for the TPU wrapper). scale must be a Python
    number. backward: one of ``BACKWARDS``: "pallas" (the dK/dV and dQ kernels) or "xla" (XLA autodiff of
    ``xla_window_attention``, recomputing the scores; matmuls at ``block_sizes.precision``).
    """
    _checks.check_attention_inputs(q, k, v, sliding_window)
    _checks.require_choice("backward", backward, BACKWARDS)
    wrapper = "tpu" if platform_kind(platform) == "tpu" else "gpu"  # CPU interprets the GPU kernels
    interpret = resolve_interpret(interpret, wrapper, platform)
    if wrapper == "gpu" and interpret is False and not triton_available():
        raise RuntimeError("window_attention(backend='pallas') on GPU needs the Pallas Triton lowering, which this "
                           "JAX lacks; use backend='cudnn' or 'xla' (or 'auto')")
    B, T, H, D = q.shape
    scale = _checks.python_scale(scale, D)
    block_sizes, blocks = _resolve_blocks(wrapper, block_sizes, T)
    window = None if sliding_window is None or sliding_window >= T else int(sliding_window)
    cfg = Config(platform=wrapper, interpret=interpret, scale=scale, window=window, T=T,
                 bq=blocks["block_q"], bk=blocks["block_k"], bq_dkv=blocks["block_q_dkv"],
                 bk_dkv=blocks["block_k_dkv"], bq_dq=blocks["block_q_dq"], bk_dq=blocks["block_k_dq"],
                 num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages,
                 vmem_limit_bytes=block_sizes.vmem_limit_bytes, precision=block_sizes.precision)
    Tp = -(-T // max(blocks.values())) * max(blocks.values())
    if backward == "xla":
        return _pallas_forward_xla_backward(cfg, Tp, q, k, v)
    return _window_attention(cfg, Tp, q, k, v)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _window_attention(cfg: Config, Tp: int, q, k, v):
    """Pad (T -> Tp, D -> power of two >= 16), lay out, run the custom-VJP kernels, undo."""
    T, D = q.shape[1], q.shape[3]
    Dp = pad_dim(D)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    qp, kp, vp = (jnp.pad(x, ((0, 0), (0, Tp - T), (0, 0), (0, Dp - D))) for x in (q, k, v))
    if cfg.platform == "tpu":
        qp, kp, vp = (jnp.swapaxes(x, 1, 2) for x in (qp, kp, vp))
    o = _attention_core(cfg, qp, kp, vp)
    if cfg.platform == "tpu":
        o = jnp.swapaxes(o, 1, 2)
    return o[:, :T, :, :D]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _pallas_forward_xla_backward(cfg: Config, Tp: int, q, k, v):
    """``backward="xla"``: the Pallas forward; the gradient is XLA autodiff of ``xla_window_attention``."""
    return _window_attention(cfg, Tp, q, k, v)


def _pfxb_fwd(cfg, Tp, q, k, v):
    return _window_attention(cfg, Tp, q, k, v), (q, k, v)


def _pfxb_bwd(cfg, Tp, res, do):
    with jax.default_matmul_precision(cfg.precision):
        _, vjp = jax.vjp(lambda q, k, v: xla_window_attention(q, k, v, scale=cfg.scale, sliding_window=cfg.window),
                         *res)
        return vjp(do)


_pallas_forward_xla_backward.defvjp(_pfxb_fwd, _pfxb_bwd)
