"""Helpers shared by the Pallas wrappers: interpret-mode resolution, the Triton lowering's availability,
power-of-two padding. (Platform names are resolved by ``backends.platform_kind``.)"""

from __future__ import annotations

import jax
from jax.experimental.pallas import tpu as pltpu

try:  # The Pallas Triton lowering is deprecated from JAX 0.11 and will be removed; keep working without it.
    from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover - depends on the installed JAX
    pltriton = None


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def pad_dim(d: int) -> int:
    """Head dims are padded with zeros to a power of two >= 16 (Triton: power-of-two tiles, dot dims >= 16)."""
    return max(16, next_pow2(d))


def triton_available() -> bool:
    """Whether this JAX still has the Pallas Triton lowering (``pltriton.CompilerParams``)."""
    return pltriton is not None and hasattr(pltriton, "CompilerParams")


def triton_params(num_warps: int, num_stages: int):
    if not triton_available():
        raise RuntimeError("this JAX has no Pallas Triton lowering (jax.experimental.pallas.triton); the GPU Pallas "
                           "kernels need it: use backend='chunked'/'xla' (GDN) or 'cudnn'/'xla' (attention)")
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def resolve_interpret(interpret, wrapper: str, platform: str | None):
    """None -> True on a CPU-only JAX, else False. A ``pltpu.InterpretParams`` (the TPU-faithful interpreter:
    uninitialised-memory poisoning, race detection) is accepted for the TPU wrapper."""
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    if isinstance(interpret, pltpu.InterpretParams):
        if wrapper != "tpu":
            raise ValueError("interpret=pltpu.InterpretParams(...) needs platform='tpu' (the TPU wrapper)")
        return interpret
    if not isinstance(interpret, bool):
        raise ValueError(f"interpret must be None, a bool or a pltpu.InterpretParams, got {interpret!r}")
    if platform == "cpu" and not interpret:
        raise ValueError("interpret must be True (or None) when platform='cpu': Pallas only interprets on CPU")
    return interpret
