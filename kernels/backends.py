"""The backend names of both sequence mixers and the one place where ``backend="auto"`` is resolved.

Gated delta rule (``gdn.gated_delta_rule``):
    "recurrent"  token-by-token ``lax.scan`` (the oracle)
    "chunked"    the chunked algorithm in XLA: chunk-parallel stages + a ``lax.scan`` over chunks for the state
    "xla"        the recurrence for values, the chunked algorithm under differentiation (fastest on CPU)
    "pallas"     the same chunked stages in XLA, with the state scan (forward and reverse) as Pallas kernels
Window attention (``attention.window_attention``):
    "xla"        plain softmax attention (einsum + mask)
    "pallas"     flash attention kernels (Triton on GPU, Mosaic on TPU)
    "cudnn"      ``jax.nn.dot_product_attention(implementation="cudnn")`` (CUDA GPUs, bf16/fp16 only)

``auto`` picks, per platform, the fastest path that has been MEASURED correct and fast there; GPUs and TPUs follow
the same rule: a Pallas path is preferred only once a run on that platform measured it faster.
    CPU   GDN "xla"; attention "xla".
    GPU   GDN "chunked" (bf16 matmul operands with float32 accumulation when the inputs are bf16) until
          ``bench/gpu_check.sh`` measures the Pallas path faster (``GPU_GDN_PALLAS_MEASURED_FASTER``); attention
          cuDNN where it supports the call (unless ``GPU_ATTENTION_PALLAS_MEASURED_FASTER``), else Pallas
          (``attention_fallback``).
    TPU   GDN "chunked" and attention "xla" (there is no cuDNN) until a TPU run measures the Pallas paths faster
          (``TPU_GDN_PALLAS_MEASURED_FASTER``, ``TPU_ATTENTION_PALLAS_MEASURED_FASTER``).
Flip the ``*_MEASURED_FASTER`` constants below only with a measured table in BENCHMARKS.md.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from . import _checks
from ._pallas_util import triton_available

GDN_BACKENDS = ("auto", "xla", "recurrent", "chunked", "pallas")
ATTENTION_BACKENDS = ("auto", "xla", "pallas", "cudnn")

# Set to True only once a GPU run of bench/gpu_check.sh has measured the Pallas path faster (BENCHMARKS.md).
GPU_GDN_PALLAS_MEASURED_FASTER = False
GPU_ATTENTION_PALLAS_MEASURED_FASTER = False
# The same for TPU runs (Mosaic kernels): until then auto runs the XLA paths there.
TPU_GDN_PALLAS_MEASURED_FASTER = False
TPU_ATTENTION_PALLAS_MEASURED_FASTER = False

_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def platform_kind(platform: str | None = None) -> str:
    """'cpu', 'gpu' or 'tpu' for a platform name (None: JAX's default backend)."""
    name = platform or jax.default_backend()
    if name in ("gpu", "cuda", "rocm"):
        return "gpu"
    if name in ("cpu", "tpu"):
        return name
    raise ValueError(f"platform must be one of 'cpu', 'gpu', 'cuda', 'rocm', 'tpu' or None, got {platform!r}")


def resolve_gdn_backend(backend: str, platform: str | None = None) -> str:
    """The concrete GDN backend for ``backend`` on ``platform``: CPU "xla"; GPU and TPU "chunked" until the
    Pallas path is measured faster there (then "pallas"; on GPU "chunked" with one warning if this JAX lacks the
    Triton lowering)."""
    _checks.require_choice("backend", backend, GDN_BACKENDS)
    if backend != "auto":
        return backend
    kind = platform_kind(platform)
    if kind == "cpu":
        return "xla"
    if kind == "tpu":
        return "pallas" if TPU_GDN_PALLAS_MEASURED_FASTER else "chunked"
    if not GPU_GDN_PALLAS_MEASURED_FASTER:
        return "chunked"
    if triton_available():
        return "pallas"
    warn_once("gated_delta_rule(backend='auto'): this JAX has no Pallas Triton lowering; using the chunked XLA "
              "path on GPU")
    return "chunked"


def cudnn_supports(dtype, head_dim: int) -> bool:
    """The cuDNN flash-attention conditions we can check before tracing: bf16/fp16 inputs, head dim a multiple
    of 8 and at most 128 (cuDNN allows 256 on Hopper; 128 holds on every supported card)."""
    return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and head_dim % 8 == 0 \
        and head_dim <= 128


def attention_fallback(platform: str | None = None) -> str:
    """What attention uses when cuDNN cannot take a call: Pallas, or XLA (one warning) without Triton on GPU."""
    if platform_kind(platform) == "gpu" and not triton_available():
        warn_once("window_attention(backend='auto'): this JAX has no Pallas Triton lowering; using the XLA path "
                  "where cuDNN does not support the call")
        return "xla"
    return "pallas"


def resolve_attention_backend(backend: str, *, dtype, head_dim: int, platform: str | None = None) -> str:
    """The concrete attention backend: CPU "xla"; TPU "xla" until Pallas is measured faster there (then
    "pallas"); GPU "cudnn" where ``cudnn_supports`` (unless Pallas is measured faster), else
    ``attention_fallback``."""
    _checks.require_choice("backend", backend, ATTENTION_BACKENDS)
    if backend != "auto":
        return backend
    kind = platform_kind(platform)
    if kind == "cpu":
        return "xla"
    if kind == "tpu":
        return "pallas" if TPU_ATTENTION_PALLAS_MEASURED_FASTER else "xla"
    if not GPU_ATTENTION_PALLAS_MEASURED_FASTER and cudnn_supports(dtype, head_dim):
        return "cudnn"
    return attention_fallback(platform)
