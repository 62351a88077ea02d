"""ModelConfig: the hybrid stack, its window and its sleep, validated on construction."""

from __future__ import annotations

import dataclasses
from typing import Any

from sleepjax.kernels import attention as _attention
from sleepjax.kernels import gdn as _gdn

# "attn": causal attention within the window; "swa": the same, each query seeing only the last ``swa_window`` keys
# up to itself; "gdn": Gated DeltaNet; "jet": JetBlock (Jet-Nemotron: GDN's rule with a dynamic conv on v).
LAYER_KINDS = ("attn", "gdn", "jet", "swa")
ATTENTION_KINDS = ("attn", "swa")  # layers with a KV cache
FAST_WEIGHT_KINDS = ("gdn", "jet")  # layers with fast weights (what sleep consolidates)
SSM_RULES = ("delta", "hebbian")
DTYPES = ("float32", "bfloat16")
# "pass": jax.checkpoint around each block-stack pass; "window": around each window (all its passes);
# "both": nested; "none": keep every activation (fastest for tiny models, memory grows with N and windows).
REMAT_POLICIES = ("none", "pass", "window", "both")
# "hard": the attention cache is cleared after every window (Algorithm 1). "sliding" (paper section 6.4): after a
# window is consolidated, attention keeps its last L - 1 tokens, so every token sees the L tokens up to itself.
EVICTIONS = ("hard", "sliding")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The model: ``Embed -> layers (pre-norm residual blocks) -> RMSNorm -> OutProj`` and its sleep. The defaults
    are the tiny CPU-scale model (d = 64, 4 layers); the paper's sizes are in experiments/configs/common.py.

    Attention: ``attn_heads`` query heads, ``attn_kv_heads`` key/value heads of ``attn_head_dim``, RoPE with
    positions counted from the window start. GDN: ``gdn_heads`` query/key heads of ``gdn_key_dim``,
    ``gdn_value_heads`` value heads of ``gdn_value_dim``, a causal depthwise conv of ``conv_size`` within the window.
    ``window`` is L (tokens per window), ``sleep_n`` is N (passes over a consolidation window), ``eviction`` what
    attention keeps across a window boundary (``EVICTIONS``). ``sleep_layers=(start, stop)``: the sleep passes loop
    layers start..stop-1 only; the layers before run once before them and the layers from stop once after the last
    pass (default: all layers loop).

    Options for pretrained checkpoints (defaults are sleepjax's own model): ``attn_output_gate`` (attention output
    times sigmoid of a second query projection, per head), ``qk_norm`` (RMSNorm over each query/key head before
    RoPE), ``rope_dim`` (rotate only the first rope_dim dims of each head; None = all), ``norm_weight_offset``
    (RMSNorms scale by offset + weight: 1.0 for "zero-centred" norm weights; the GDN output norm excluded),
    ``mlp_free_layers`` (indices of layers without an MLP), ``tie_embeddings`` (logits use the embedding matrix),
    ``attn_bias`` (q/k/v projections with biases), ``swa_window`` (the keys a "swa" layer's query sees, itself
    included; required when ``layers`` holds "swa"), ``sandwich_norm_layers`` (layers whose mixer output and MLP
    output are RMS-normalised before they join the residual stream: Ouro's four norms per layer).

    Adaptive sleep depth: ``sleep_tol`` > 0 stops an example's sleep passes once a pass changes its fast weights
    by less than sleep_tol relative to the pass before (at most ``sleep_n`` passes; 0 = always sleep_n).

    Looping (Ouro's Universal-Transformer loop): ``loop_steps`` = T runs the stack T times per pass with shared
    weights, each loop but the last ending in the final norm (the next loop starts from a normalised stream);
    every loop of a layer has its own attention cache and fast weights. ``stack`` lists the T * len(layers) layer
    runs in order; ``sleep_layers`` and the fast weights index it. A sleep pass over the whole stack is T more
    loops: consecutive passes are separated by the final norm too.

    JetBlock ("jet" layers): ``jet_heads`` heads (query/key and value alike) of ``jet_key_dim`` / ``jet_value_dim``;
    v goes through a causal depthwise conv of ``jet_conv_size`` taps whose per-token, per-channel kernel is
    generated from the block input by a two-layer MLP of hidden size jet_heads * jet_value_dim //
    ``jet_conv_reduction``; ``jet_norm_eps`` is the eps of its gated output RMSNorm.
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
    eviction: str = "hard"
    sleep_layers: tuple[int, int] | None = None
    attn_output_gate: bool = False
    qk_norm: bool = False
    rope_dim: int | None = None
    norm_weight_offset: float = 0.0
    mlp_free_layers: tuple[int, ...] = ()
    tie_embeddings: bool = False
    attn_bias: bool = False
    swa_window: int | None = None
    jet_heads: int = 2
    jet_key_dim: int = 32
    jet_value_dim: int = 64
    jet_conv_size: int = 4
    jet_conv_reduction: int = 8
    jet_norm_eps: float = 1e-5
    sandwich_norm_layers: tuple[int, ...] = ()
    loop_steps: int = 1
    sleep_tol: float = 0.0

    def __post_init__(self):
        for name in ("layers", "sleep_layers", "mlp_free_layers", "sandwich_norm_layers"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        positive = ("vocab_size", "d_model", "attn_heads", "attn_kv_heads", "attn_head_dim", "gdn_heads",
                    "gdn_value_heads", "gdn_key_dim", "gdn_value_dim", "conv_size", "mlp_dim", "window", "sleep_n",
                    "jet_heads", "jet_key_dim", "jet_value_dim", "jet_conv_size", "jet_conv_reduction", "loop_steps")
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
        if self.rope_dim is not None and (not _is_int(self.rope_dim) or self.rope_dim < 2 or self.rope_dim % 2
                                          or self.rope_dim > self.attn_head_dim):
            raise ValueError(f"ModelConfig.rope_dim must be None or an even int in [2, attn_head_dim="
                             f"{self.attn_head_dim}], got {self.rope_dim!r}")
        num_layers = len(self.layers)
        depth = num_layers * self.loop_steps
        if self.sleep_layers is not None:
            if (not isinstance(self.sleep_layers, tuple) or len(self.sleep_layers) != 2
                    or not all(_is_int(i) for i in self.sleep_layers)
                    or not 0 <= self.sleep_layers[0] < self.sleep_layers[1] <= depth):
                raise ValueError(f"ModelConfig.sleep_layers must be None or (start, stop) with 0 <= start < stop <= "
                                 f"{depth} (the layer runs of a pass: len(layers) * loop_steps), got "
                                 f"{self.sleep_layers!r}")
        for name in ("mlp_free_layers", "sandwich_norm_layers"):
            value = getattr(self, name)
            if (not isinstance(value, tuple) or not all(_is_int(i) for i in value)
                    or not all(0 <= i < num_layers for i in value) or len(set(value)) != len(value)):
                raise ValueError(f"ModelConfig.{name} must be a tuple of distinct layer indices in [0, "
                                 f"{num_layers}), got {value!r}")
        if "swa" in self.layers and (not _is_int(self.swa_window) or self.swa_window < 1):
            raise ValueError(f"ModelConfig.swa_window must be an int >= 1 when layers holds 'swa', got "
                             f"{self.swa_window!r}")
        if self.swa_window is not None and (not _is_int(self.swa_window) or self.swa_window < 1):
            raise ValueError(f"ModelConfig.swa_window must be None or an int >= 1, got {self.swa_window!r}")
        if self.jet_heads * self.jet_value_dim < self.jet_conv_reduction:
            raise ValueError(f"ModelConfig.jet_conv_reduction ({self.jet_conv_reduction}) must be at most "
                             f"jet_heads * jet_value_dim ({self.jet_heads * self.jet_value_dim}): the dynamic-conv "
                             f"generator's hidden size is their quotient")
        if (not isinstance(self.sleep_tol, (int, float)) or isinstance(self.sleep_tol, bool)
                or not 0 <= self.sleep_tol < float("inf")):
            raise ValueError(f"ModelConfig.sleep_tol must be a finite number >= 0 (0: off), got {self.sleep_tol!r}")
        if (not isinstance(self.jet_norm_eps, (int, float)) or isinstance(self.jet_norm_eps, bool)
                or not self.jet_norm_eps > 0):
            raise ValueError(f"ModelConfig.jet_norm_eps must be a number > 0, got {self.jet_norm_eps!r}")
        for name in ("attn_output_gate", "qk_norm", "tie_embeddings", "attn_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.norm_weight_offset, (int, float)) or isinstance(self.norm_weight_offset, bool):
            raise ValueError(f"ModelConfig.norm_weight_offset must be a number, got {self.norm_weight_offset!r}")
        choices = {"ssm_rule": SSM_RULES, "dtype": DTYPES, "remat": REMAT_POLICIES, "eviction": EVICTIONS,
                   "gdn_backend": _gdn.BACKENDS, "attn_backend": _attention.BACKENDS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"ModelConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 16 or self.chunk_size % 16:
            raise ValueError(f"ModelConfig.chunk_size must be a positive multiple of 16, got {self.chunk_size!r}")

    @property
    def stack(self) -> tuple[str, ...]:
        """The layer kinds one pass runs, in order: ``layers`` repeated ``loop_steps`` times (run i uses the weights of
        layer i % len(layers) and has its own carry: KV cache or fast weights)."""
        return self.layers * self.loop_steps

    def weights_of(self, run: int) -> int:
        """The layer whose weights stack entry ``run`` uses."""
        return run % len(self.layers)

    def ends_loop(self, run: int) -> bool:
        """True after stack entry ``run`` when a loop ends there and another follows (the final norm applies)."""
        return (run + 1) % len(self.layers) == 0 and run + 1 < len(self.stack)

    @property
    def num_gdn_layers(self) -> int:
        return sum(kind == "gdn" for kind in self.layers)

    @property
    def num_attn_layers(self) -> int:
        """Layer runs with a KV cache ("attn" and "swa", each loop its own)."""
        return sum(kind in ATTENTION_KINDS for kind in self.stack)

    @property
    def num_fast_layers(self) -> int:
        """Layer runs with fast weights ("gdn" and "jet", each loop its own): the length of the model's
        FastWeights."""
        return sum(kind in FAST_WEIGHT_KINDS for kind in self.stack)

    @property
    def jet_generator_dim(self) -> int:
        """The hidden size of a JetBlock's dynamic-conv kernel generator."""
        return self.jet_heads * self.jet_value_dim // self.jet_conv_reduction

    def fast_weight_shape(self, kind: str) -> tuple[int, int, int]:
        """(heads, key dim, value dim) of the fast weights of a layer of ``kind`` ("gdn" or "jet")."""
        if kind == "jet":
            return (self.jet_heads, self.jet_key_dim, self.jet_value_dim)
        return (self.gdn_value_heads, self.gdn_key_dim, self.gdn_value_dim)

    def attention_window(self, kind: str) -> int | None:
        """The keys a query of an attention layer of ``kind`` sees at most (None: all of its window)."""
        return self.swa_window if kind == "swa" else None

    @property
    def sleep_layer_range(self) -> tuple[int, int]:
        """(start, stop) of the stack entries the sleep passes loop."""
        return self.sleep_layers or (0, len(self.stack))

    @property
    def norm_between_passes(self) -> bool:
        """A looped model whose sleep passes run the whole stack: each pass after the first starts from the final
        norm of the previous one's output, as each Ouro loop does."""
        return self.loop_steps > 1 and self.sleep_layer_range == (0, len(self.stack))

    def has_mlp(self, layer: int) -> bool:
        """Whether layer (or stack entry) ``layer`` has an MLP."""
        return self.weights_of(layer) not in self.mlp_free_layers

    def has_sandwich_norm(self, layer: int) -> bool:
        """Whether layer (or stack entry) ``layer`` normalises its mixer and MLP outputs."""
        return self.weights_of(layer) in self.sandwich_norm_layers

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

