"""sleepjax.kernels: the two sequence mixers of the hybrid model, each with a reference, an XLA path and (on
GPU/TPU) Pallas kernels behind one dispatch function. This package never imports the rest of sleepjax."""

from .attention import cached_attention_step, window_attention
from .gdn import gated_delta_rule, gated_delta_rule_step, unit_lower_inverse

__all__ = [
    "cached_attention_step",
    "gated_delta_rule",
    "gated_delta_rule_step",
    "unit_lower_inverse",
    "window_attention",
]
