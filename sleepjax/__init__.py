"""sleepjax: LLM sleep in JAX.

A hybrid language model (window-local attention + Gated DeltaNet fast weights) that consolidates every full
window into its fast weights with N extra recurrent passes ("sleep") and then drops its KV cache.

Public API (all pure functions over parameter pytrees):
    ModelConfig, init, init_state, consolidate, window_kv, forward, loss, stream_init, stream_step, stream_prefill,
    generate (the function; its module is ``sleepjax.generate``: ``from sleepjax.generate import Generation``)
"""

from sleepjax.config import ModelConfig
from sleepjax.model import (FastWeights, Params, consolidate, forward, init, init_state, loss, num_params,
                            window_kv)
from sleepjax.stream import Stream, stream_init, stream_prefill, stream_step
from sleepjax.generate import Generation, generate  # the function shadows the submodule attribute

__all__ = [
    "FastWeights",
    "Generation",
    "ModelConfig",
    "Params",
    "Stream",
    "consolidate",
    "forward",
    "generate",
    "init",
    "init_state",
    "loss",
    "num_params",
    "stream_init",
    "stream_prefill",
    "stream_step",
    "window_kv",
]
