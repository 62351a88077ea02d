"""Helpers shared by the Pallas wrappers: platform and interpret-mode resolution, power-of-two padding."""

from __future__ import annotations

import jax
from jax.experimental.pallas import tpu as pltpu


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def resolve_platform(platform: str | None) -> str:
    """'gpu' or 'tpu' wrapper for a platform name (None: the default backend; CPU runs the GPU wrapper)."""
    name = platform or jax.default_backend()
    if name in ("gpu", "cuda", "rocm", "cpu"):
        return "gpu"
    if name == "tpu":
        return "tpu"
    raise ValueError(f"platform must be one of 'gpu', 'cuda', 'rocm', 'tpu', 'cpu' or None, got {platform!r}")


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
