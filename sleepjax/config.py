"""ModelConfig: the hybrid stack, its window and its sleep, validated on construction."""

from __future__ import annotations

import dataclasses
from typing import Any

from sleepjax.kernels import attention as _attention
from sleepjax.kernels import gdn as _gdn

LAYER_KINDS = ("attn", "gdn")
SSM_RULES = ("delta", "hebbian")
DTYPES = ("float32", "bfloat16")
# "pass": jax.checkpoint around each block-stack pass; "window": around each window (all its passes);
# "both": nested; "none": keep every activation (fastest for tiny models, memory grows with N and windows).
REMAT_POLICIES = ("none", "pass", "window", "both")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The model: ``Embed -> layers (pre-norm residual blocks) -> RMSNorm -> OutProj`` and its sleep.

    Attention: ``attn_heads`` query heads, ``attn_kv_heads`` key/value heads of ``attn_head_dim``, RoPE with
    positions counted from the window start. GDN: ``gdn_heads`` query/key heads of ``gdn_key_dim``,
    ``gdn_value_heads`` value heads of ``gdn_value_dim``, a causal depthwise conv of ``conv_size`` within the window.
    ``window`` is L (tokens per window), ``sleep_n`` is N (passes over a consolidation window).
    """

    vocab_size: int = 256
    d_model: int = 64
    layers: tuple[str, ...] = ("attn", "gdn", "attn", "gdn")
    attn_heads: int = 2
    attn_kv_heads: int = 2
    attn_head_dim: int = 32
    gdn_heads: int = 2
    gdn_value_heads: int = 2
    gdn_key_dim: int = 32
    gdn_value_dim: int = 32
    conv_size: int = 4
    mlp_dim: int = 256
    window: int = 24
    sleep_n: int = 1
    ssm_rule: str = "delta"
    dtype: str = "float32"
    remat: str = "pass"
    gdn_backend: str = "auto"
    attn_backend: str = "auto"
    chunk_size: int = 64
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6

    def __post_init__(self):
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        positive = ("vocab_size", "d_model", "attn_heads", "attn_kv_heads", "attn_head_dim", "gdn_heads",
                    "gdn_value_heads", "gdn_key_dim", "gdn_value_dim", "conv_size", "mlp_dim", "window", "sleep_n")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be an int >= 1, got {value!r}")
        if not self.layers or any(kind not in LAYER_KINDS for kind in self.layers):
            raise ValueError(f"ModelConfig.layers must be a non-empty tuple of {LAYER_KINDS}, got {self.layers!r}")
        if self.attn_heads % self.attn_kv_heads:
            raise ValueError(f"ModelConfig.attn_heads ({self.attn_heads}) must be a multiple of attn_kv_heads "
                             f"({self.attn_kv_heads})")
        if self.gdn_value_heads % self.gdn_heads:
            raise ValueError(f"ModelConfig.gdn_value_heads ({self.gdn_value_heads}) must be a multiple of "
                             f"gdn_heads ({self.gdn_heads})")
        if self.attn_head_dim % 2:
            raise ValueError(f"ModelConfig.attn_head_dim must be even for RoPE, got {self.attn_head_dim}")
        choices = {"ssm_rule": SSM_RULES, "dtype": DTYPES, "remat": REMAT_POLICIES,
                   "gdn_backend": _gdn.BACKENDS, "attn_backend": _attention.BACKENDS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"ModelConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 16 or self.chunk_size % 16:
            raise ValueError(f"ModelConfig.chunk_size must be a positive multiple of 16, got {self.chunk_size!r}")

    @property
    def num_gdn_layers(self) -> int:
        return sum(kind == "gdn" for kind in self.layers)

    @property
    def num_attn_layers(self) -> int:
        return sum(kind == "attn" for kind in self.layers)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """``tiny``: CPU scale (d = 64, 4 layers). ``paper``: the Rule 110 model of the paper (d = 256, 4 layers).
        ``depo_paper``: the paper's Depo model (10 layers, d = 512)."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=64, layers=("attn", "gdn", "attn", "gdn"), attn_heads=2, attn_kv_heads=2,
                 attn_head_dim=32, gdn_heads=2, gdn_value_heads=2, gdn_key_dim=32, gdn_value_dim=32, mlp_dim=256),
    "paper": dict(d_model=256, layers=("attn", "gdn", "attn", "gdn"), attn_heads=4, attn_kv_heads=4,
                  attn_head_dim=64, gdn_heads=4, gdn_value_heads=4, gdn_key_dim=64, gdn_value_dim=64, mlp_dim=1024),
    "depo_paper": dict(d_model=512, layers=("attn", "gdn") * 5, attn_heads=8, attn_kv_heads=8, attn_head_dim=64,
                       gdn_heads=8, gdn_value_heads=8, gdn_key_dim=64, gdn_value_dim=64, mlp_dim=2048),
}
