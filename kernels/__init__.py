"""sleepjax.kernels: the two sequence mixers of the hybrid model. This package never imports the rest of sleepjax.

Layout (imports flow downwards only):
    gdn.py, attention.py            public entry points and backend dispatch (names: backends.py)
    sharding.py                     shard_map wrappers for meshes (the mesh itself: sleepjax/mesh.py)
    gdn_pallas.py                   GDN with the Pallas state scan (validation, block sizes)
    gdn_chunked.py, gdn_scan.py     the chunked GDN algorithm in XLA and its state scan (custom VJP)
    gdn_reference.py                token recurrence (the oracle) and decode step
    attention_pallas.py             flash attention (custom VJP, block sizes)
    attention_xla.py                XLA reference, cached one-query step, the cuDNN call
    gdn_scan_gpu.py, attention_gpu.py    GPU (Pallas Triton) kernels
    gdn_scan_tpu.py, attention_tpu.py    TPU (Mosaic) kernels
    attention_blocks.py             per-block attention math shared by the GPU and TPU kernels
    backends.py, _checks.py         backend and platform names (``auto``), input checks
    _matmul.py, _pallas_util.py     the float32-accumulating dot (XLA and in-kernel), Pallas wrapper helpers
"""

from .attention import cached_attention_step, window_attention
from .gdn import gated_delta_rule, gated_delta_rule_step, unit_lower_inverse

__all__ = [
    "cached_attention_step",
    "gated_delta_rule",
    "gated_delta_rule_step",
    "unit_lower_inverse",
    "window_attention",
]
