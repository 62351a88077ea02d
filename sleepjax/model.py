"""The hybrid model and Algorithm 1: parameters, fast weights, consolidation (sleep) and the windowed forward.

Only the fast weights (every GDN and JetBlock layer's S, float32) cross a window boundary. A consolidation window runs
the block stack ``sleep_n`` times, pass n consuming pass n-1's hidden states and every GDN layer continuing from the
S the previous pass ended with; a supervised (wake) window runs it once.

The decision is each example's own: an example sleeps over a window iff none of ITS positions there is
supervised, whatever the other examples of its batch do. The passes a compiled call runs are fixed when it is
traced by a sleep schedule (``sleepjax/schedule.py``): S windows run N passes, W windows one, M windows N passes
with a per-example select (an example that wakes keeps its first pass). There is no data-dependent branch: a
``lax.cond`` over passes decided for the whole batch (what earlier versions did) both woke every example with
one supervised and, linearised, kept residuals that grew training memory with N.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sleepjax import layers
from sleepjax import schedule as schedule_lib
from sleepjax.config import ATTENTION_KINDS, FAST_WEIGHT_KINDS, ModelConfig

FastWeights = tuple  # one float32 [B, Hv, Dk, Dv] array per fast-weight layer (GDN or JetBlock), in layer order


@flax.struct.dataclass
class Params:
    """Model parameters (float32). ``layers[i]`` is layer i's dict; ``config`` is static pytree metadata,
    so every function below needs nothing but ``params``."""

    embed: jax.Array  # [V, d]
    layers: tuple  # dicts, one per layer
    final_norm: jax.Array  # [d]
    unembed: jax.Array | None  # [d, V]; None when the config ties it to ``embed``
    config: ModelConfig = flax.struct.field(pytree_node=False)


# ---------------------------------------------------------------------------------------------------------------
# Initialisation


def _normal(key, shape, fan_in):
    return jax.random.normal(key, shape, jnp.float32) / math.sqrt(fan_in)


def _init_mlp(key, cfg: ModelConfig):
    k1, k2, k3 = jax.random.split(key, 3)
    d, f = cfg.d_model, cfg.mlp_dim
    return {"w_gate": _normal(k1, (d, f), d), "w_up": _normal(k2, (d, f), d), "w_down": _normal(k3, (f, d), f)}


def _norm_weight(cfg: ModelConfig, size: int):
    """A norm weight that starts as the identity scale: 1 - norm_weight_offset."""
    return jnp.full((size,), 1.0 - cfg.norm_weight_offset, jnp.float32)


def _init_attention(key, cfg: ModelConfig):
    """The attention mixer; returns (params, the key of its MLP)."""
    k = jax.random.split(key, 5)
    d, hd = cfg.d_model, cfg.attn_head_dim
    block = {
        "norm1": _norm_weight(cfg, d),
        "wq": _normal(k[0], (d, cfg.attn_heads * hd), d),
        "wk": _normal(k[1], (d, cfg.attn_kv_heads * hd), d),
        "wv": _normal(k[2], (d, cfg.attn_kv_heads * hd), d),
        "wo": _normal(k[3], (cfg.attn_heads * hd, d), cfg.attn_heads * hd),
    }
    if cfg.attn_output_gate:
        block["wq_gate"] = _normal(jax.random.fold_in(key, 1), (d, cfg.attn_heads * hd), d)
    if cfg.qk_norm:
        block["q_norm"], block["k_norm"] = _norm_weight(cfg, hd), _norm_weight(cfg, hd)
    if cfg.attn_bias:
        block["bq"] = jnp.zeros((cfg.attn_heads * hd,), jnp.float32)
        block["bk"] = jnp.zeros((cfg.attn_kv_heads * hd,), jnp.float32)
        block["bv"] = jnp.zeros((cfg.attn_kv_heads * hd,), jnp.float32)
    return block, k[4]


def _init_gdn(key, cfg: ModelConfig):
    """The GDN mixer; returns (params, the key of its MLP)."""
    k = jax.random.split(key, 9)
    d, hv, dv = cfg.d_model, cfg.gdn_value_heads, cfg.gdn_value_dim
    channels = layers.gdn_conv_channels(cfg)
    # Decay rates as in Mamba-2 / GDN: A in [1, 16], dt log-uniform in [1e-3, 0.1] (stored as softplus^-1).
    a = jax.random.uniform(k[0], (hv,), minval=1.0, maxval=16.0)
    dt = jnp.exp(jax.random.uniform(k[1], (hv,), minval=math.log(1e-3), maxval=math.log(0.1)))
    return {
        "norm1": _norm_weight(cfg, d),
        "w_qkv": _normal(k[2], (d, channels), d),
        "conv": jax.random.uniform(k[3], (cfg.conv_size, channels), minval=-1.0, maxval=1.0)
        / math.sqrt(cfg.conv_size),
        "w_a": _normal(k[4], (d, hv), d),
        "w_b": _normal(k[5], (d, hv), d),
        "a_log": jnp.log(a),
        "dt_bias": dt + jnp.log(-jnp.expm1(-dt)),
        "w_gate": _normal(k[6], (d, hv * dv), d),
        "o_norm": jnp.ones((dv,)),
        "wo": _normal(k[7], (hv * dv, d), hv * dv),
    }, k[8]


def _init_jet(key, cfg: ModelConfig):
    """The JetBlock mixer; returns (params, the key of its MLP). The dynamic conv's generator starts as Jet-Nemotron's
    does: W1, W2 zero, so the kernel is the static b2 at first."""
    k = jax.random.split(key, 10)
    d, H, dk, dv = cfg.d_model, cfg.jet_heads, cfg.jet_key_dim, cfg.jet_value_dim
    C, K, r = H * dv, cfg.jet_conv_size, cfg.jet_generator_dim
    a = jax.random.uniform(k[0], (H,), minval=1.0, maxval=16.0)
    dt = jnp.exp(jax.random.uniform(k[1], (H,), minval=math.log(1e-3), maxval=math.log(0.1)))
    return {
        "norm1": _norm_weight(cfg, d),
        "wq": _normal(k[2], (d, H * dk), d), "wk": _normal(k[3], (d, H * dk), d), "wv": _normal(k[4], (d, C), d),
        "conv_w1": jnp.zeros((d, r), jnp.float32), "conv_w2": jnp.zeros((r, C * K), jnp.float32),
        "conv_b2": jax.random.uniform(k[5], (C * K,), minval=-1.0, maxval=1.0) / math.sqrt(K),
        "w_a": _normal(k[6], (d, H), d), "w_b": _normal(k[7], (d, H), d),
        "a_log": jnp.log(a), "dt_bias": dt + jnp.log(-jnp.expm1(-dt)),
        "w_gate": _normal(k[8], (d, C), d), "o_norm": jnp.ones((dv,)), "wo": _normal(k[9], (C, d), C),
    }, jax.random.fold_in(key, 7)


_INIT_MIXER = {"attn": _init_attention, "swa": _init_attention, "gdn": _init_gdn, "jet": _init_jet}


def init_block(config: ModelConfig, layer: int, key) -> dict:
    """Fresh parameters of layer ``layer``: its mixer, and its MLP unless the layer is MLP-free."""
    block, mlp_key = _INIT_MIXER[config.layers[layer]](key, config)
    if config.has_mlp(layer):
        block["norm2"] = _norm_weight(config, config.d_model)
        block["mlp"] = _init_mlp(mlp_key, config)
    if config.has_sandwich_norm(layer):
        block["mixer_out_norm"] = _norm_weight(config, config.d_model)
        if config.has_mlp(layer):
            block["mlp_out_norm"] = _norm_weight(config, config.d_model)
    return block


def init(config: ModelConfig, key) -> Params:
    """Fresh float32 parameters for ``config``."""
    if not isinstance(config, ModelConfig):
        raise ValueError(f"config must be a ModelConfig, got {type(config).__name__}")
    keys = jax.random.split(key, len(config.layers) + 2)
    blocks = tuple(init_block(config, i, keys[i]) for i in range(len(config.layers)))
    return Params(
        embed=jax.random.normal(keys[-2], (config.vocab_size, config.d_model), jnp.float32),
        layers=blocks,
        final_norm=_norm_weight(config, config.d_model),
        unembed=None if config.tie_embeddings else _normal(keys[-1], (config.d_model, config.vocab_size),
                                                           config.d_model),
        config=config,
    )


def init_state(params: Params, batch_size: int) -> FastWeights:
    """Zero fast weights for ``batch_size`` sequences: one float32 [B, Hv, Dk, Dv] per fast-weight layer (GDN or
    JetBlock, each with its own head sizes: ``ModelConfig.fast_weight_shape``)."""
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    cfg = params.config
    return tuple(jnp.zeros((int(batch_size),) + cfg.fast_weight_shape(kind), jnp.float32)
                 for kind in cfg.stack if kind in FAST_WEIGHT_KINDS)


# Logical axis names of every weight, by (block kind, name). "embed" is the model dimension (FSDP shards it),
# "heads" a dimension made of whole attention or GDN value heads and "mlp" the MLP hidden dimension (tensor
# parallelism shards them); None is never sharded. The fused GDN q|k|v projection and its conv are not split over
# heads: their channels interleave three head layouts.
_LOGICAL_AXES = {
    "embed": ("vocab", "embed"), "unembed": ("embed", "vocab"), "final_norm": (None,),
    "norm1": (None,), "norm2": (None,), "mixer_out_norm": (None,), "mlp_out_norm": (None,), "w_up": ("embed", "mlp"), "w_down": ("mlp", "embed"),
    ("attn", "wq"): ("embed", "heads"), ("attn", "wk"): ("embed", "heads"), ("attn", "wv"): ("embed", "heads"),
    ("attn", "wo"): ("heads", "embed"), ("attn", "wq_gate"): ("embed", "heads"), ("attn", "q_norm"): (None,),
    ("attn", "k_norm"): (None,),
    ("gdn", "w_qkv"): ("embed", None), ("gdn", "conv"): (None, None), ("gdn", "w_a"): ("embed", None),
    ("gdn", "w_b"): ("embed", None), ("gdn", "a_log"): (None,), ("gdn", "dt_bias"): (None,),
    ("gdn", "w_gate"): ("embed", "heads"), ("gdn", "o_norm"): (None,), ("gdn", "wo"): ("heads", "embed"),
    ("attn", "bq"): ("heads",), ("attn", "bk"): ("heads",), ("attn", "bv"): ("heads",),
    ("jet", "wq"): ("embed", "heads"), ("jet", "wk"): ("embed", "heads"), ("jet", "wv"): ("embed", None),
    ("jet", "conv_w1"): ("embed", None), ("jet", "conv_w2"): (None, None), ("jet", "conv_b2"): (None,),
    ("jet", "w_a"): ("embed", None), ("jet", "w_b"): ("embed", None), ("jet", "a_log"): (None,),
    ("jet", "dt_bias"): (None,), ("jet", "w_gate"): ("embed", "heads"), ("jet", "o_norm"): (None,),
    ("jet", "wo"): ("heads", "embed"),
    ("mlp", "w_gate"): ("embed", "mlp"),
}


_PARAM_FIELDS = ("embed", "layers", "final_norm", "unembed")


def logical_axes_at(path, config: ModelConfig) -> tuple | None:
    """Logical axes of the parameter at ``path`` (a key path into params, or into any pytree holding a copy of
    the params structure, such as optimizer moments). None when the path does not lead to a parameter."""
    names = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path]
    starts = [i for i, n in enumerate(names) if n in _PARAM_FIELDS and isinstance(path[i], jax.tree_util.GetAttrKey)]
    if not starts:
        return None
    names = names[starts[-1]:]
    if names[0] != "layers":
        return _LOGICAL_AXES.get(names[0])
    if len(names) < 3 or not isinstance(names[1], int) or names[1] >= len(config.layers):
        return None
    kind = "mlp" if "mlp" in names else {"swa": "attn"}.get(config.layers[names[1]], config.layers[names[1]])
    return _LOGICAL_AXES.get((kind, names[-1])) or _LOGICAL_AXES.get(names[-1])


def logical_axes(params: Params):
    """A pytree like ``params`` whose leaves are tuples of logical axis names (see ``_LOGICAL_AXES``)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: logical_axes_at(path, params.config), params)


def num_params(params: Params) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(params))


# ---------------------------------------------------------------------------------------------------------------
# Input checks (raise before any work is done)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_tokens(name: str, tokens, cfg: ModelConfig, rank: int, layout: str) -> None:
    if not hasattr(tokens, "dtype") or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array {layout}, got {getattr(tokens, 'dtype', type(tokens))}")
    if tokens.ndim != rank:
        raise ValueError(f"{name} must have rank {rank} {layout}, got shape {tuple(tokens.shape)}")
    if _is_concrete(tokens) and tokens.size:
        values = np.asarray(tokens)  # concrete: checked on the host, nothing is staged into a trace
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"{name} ids must lie in [0, vocab_size={cfg.vocab_size}), got range [{lo}, {hi}]")


def check_state(state, params: Params, batch_size: int) -> None:
    cfg = params.config
    if not isinstance(state, tuple) or len(state) != cfg.num_fast_layers:
        raise ValueError(f"state must be a tuple of {cfg.num_fast_layers} fast weights (one per GDN or JetBlock "
                         f"layer, see init_state), got {type(state).__name__} of length "
                         f"{len(state) if hasattr(state, '__len__') else '?'}")
    kinds = [kind for kind in cfg.stack if kind in FAST_WEIGHT_KINDS]
    for i, (s, kind) in enumerate(zip(state, kinds)):
        expected = (batch_size,) + cfg.fast_weight_shape(kind)
        if tuple(s.shape) != expected or s.dtype != jnp.float32:
            raise ValueError(f"state[{i}] must be float32 {expected} [B, Hv, Dk, Dv], got {s.dtype} {tuple(s.shape)}")


def check_n(n) -> int:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n (sleep passes) must be an int >= 1, got {n!r}")
    return int(n)


# ---------------------------------------------------------------------------------------------------------------
# The block stack


def embed(params: Params, tokens):
    return params.embed[tokens].astype(layers.dtype_of(params.config))


def unembed(params: Params, h):
    cfg = params.config
    weight = params.embed.T if cfg.tie_embeddings else params.unembed
    return layers.dense(layers.norm(h, params.final_norm, cfg).astype(jnp.float32), weight)


def _group(kind: str) -> str:
    """"attn" for the layers with a KV cache (attn, swa), "gdn" for those with fast weights (gdn, jet)."""
    return "attn" if kind in ATTENTION_KINDS else "gdn"


def per_layer(cfg: ModelConfig, attn, gdn) -> tuple:
    """One tuple indexed by layer from one sequence per group, each in layer order: ``attn`` for the attention
    layers (attn, swa), ``gdn`` for the fast-weight layers (gdn, jet; a layer's fast weights are ``FastWeights[j]``
    for the j-th of them)."""
    items = {"attn": iter(attn), "gdn": iter(gdn)}
    return tuple(next(items[_group(kind)]) for kind in cfg.stack)


def of_kind(cfg: ModelConfig, by_layer, kind: str) -> tuple:
    """The entries of the layers of group ``kind`` ("attn": attn and swa; "gdn": gdn and jet), in layer order (the
    inverse of ``per_layer``)."""
    return tuple(x for x, k in zip(by_layer, cfg.stack) if _group(k) == kind)


def layers_pass(params: Params, h, carries: tuple, span: layers.Span, lo: int = 0, hi: int | None = None):
    """Stack entries lo..hi-1 (default: all; ``ModelConfig.stack``) once, each norm -> mixer -> residual -> MLP,
    and the final norm where a loop of a looped model ends: the one layer loop of a window, the sleep passes and a
    streamed token. h [B, T, d] (a window) or [B, d] (one token, ``span.position``); carries: one ``layers.Carry``
    per stack entry, of which only those of entries lo..hi-1 change. Returns (h, carries)."""
    cfg = params.config
    carries = list(carries)
    for i in range(lo, len(cfg.stack) if hi is None else hi):
        p = params.layers[cfg.weights_of(i)]
        sandwich = cfg.has_sandwich_norm(i)
        out, carries[i] = layers.BLOCKS[cfg.stack[i]](p, layers.norm(h, p["norm1"], cfg), carries[i], span, cfg)
        h = h + (layers.norm(out, p["mixer_out_norm"], cfg) if sandwich else out)
        if cfg.has_mlp(i):
            out = layers.mlp(p["mlp"], layers.norm(h, p["norm2"], cfg))
            h = h + (layers.norm(out, p["mlp_out_norm"], cfg) if sandwich else out)
        if cfg.ends_loop(i):
            h = layers.norm(h, params.final_norm, cfg)
    return h, tuple(carries)


def _window_carries(params: Params, h, state: FastWeights, context=None) -> tuple:
    """The carries of a window h [B, T, d]: every GDN layer's fast weights and, under sliding eviction (``context``:
    per attention layer (k, v, has_context) of the previous window), room for the window's keys and values."""
    cfg = params.config
    if context is None:
        attn = [layers.Carry()] * cfg.num_attn_layers
    else:
        zeros = jnp.zeros(h.shape[:2] + (cfg.attn_kv_heads, cfg.attn_head_dim), h.dtype)
        attn = [layers.Carry(kv=(zeros, zeros), context=c) for c in context]
    return per_layer(cfg, attn, [layers.Carry(fast=s) for s in state])


def blocks_pass(params: Params, h, state: FastWeights, valid=None, lo: int = 0, hi: int | None = None):
    """Layers lo..hi-1 (default: the whole stack) once over a window (hard eviction). h [B, T, d] -> (h, state).
    ``valid`` [T] bool marks real tokens; padding (False) leaves the fast weights untouched."""
    h, carries = layers_pass(params, h, _window_carries(params, h, state), layers.Span(valid=valid), lo, hi)
    return h, tuple(c.fast for c in of_kind(params.config, carries, "gdn"))


def _select(keep, new, old):
    """Per example: ``new`` where keep [B] is True, else ``old`` (trees of arrays with a leading batch axis)."""
    return jax.tree_util.tree_map(
        lambda a, b: jnp.where(keep.reshape(keep.shape + (1,) * (a.ndim - 1)), a, b), new, old)


def _after_pass(i, keep, h, carries, new_h, new):
    """(h, carries) after sleep pass i, from its input and its output. Only the first (wake) pass leaves its keys
    and values: what a window hands on under sliding eviction is what a stream computes token by token. The later
    passes change h and the fast weights only for the examples in ``keep`` ([B] bool, None = all; an example that
    wakes, or has stopped sleeping, keeps what it had)."""
    if keep is not None:
        new_h = _select(keep, new_h, h)
    out = []
    for n, c in zip(new, carries):
        if n is not c:  # a layer the pass ran
            fast = n.fast if keep is None else _select(keep, n.fast, c.fast)
            n = n._replace(fast=fast, kv=jax.tree_util.tree_map(lambda a, b: jnp.where(i == 0, a, b), n.kv, c.kv))
        out.append(n)
    return new_h, tuple(out)


def _fast_change(old: tuple, new: tuple, lo: int, hi: int, cfg: ModelConfig, batch: int):
    """Per example [B]: |S_new - S_old| / |S_old| over the fast weights of stack entries lo..hi-1 (Frobenius)."""
    pairs = [(o.fast, n.fast) for j, (o, n) in enumerate(zip(old, new))
             if lo <= j < hi and cfg.stack[j] in FAST_WEIGHT_KINDS]
    if not pairs:  # nothing to consolidate: no pass changes anything
        return jnp.zeros((batch,), jnp.float32)
    diff = sum(jnp.sum(jnp.square(b - a), axis=(1, 2, 3)) for a, b in pairs)
    norm = sum(jnp.sum(jnp.square(a), axis=(1, 2, 3)) for a, _ in pairs)
    return jnp.sqrt(diff / jnp.maximum(norm, 1e-30))


def run_passes(params: Params, h, state: FastWeights, n: int, *, sleeps=None, valid=None, context=None,
               last: bool = False, passes=None, return_taken: bool = False):
    """A window: the layers before ``sleep_layers`` once, ``n`` passes of the sleep layers as a ``lax.scan``
    (compile time stays flat in n), the layers after them once on the last pass's output.

    ``sleeps`` (bool [B], may be traced; None = every example): the examples that sleep. The others keep their
    first pass's hidden states and fast weights through the later passes (which the batch still computes), so each
    example gets exactly what running it alone would give. No branch depends on data: the passes a window costs
    are fixed when it is traced (see ``sleepjax/schedule.py``).
    ``context`` (sliding eviction): per attention layer (k, v, has_context) of the previous window.
    ``last``: the sequence's last window (its backward follows its forward at once: one pass is not checkpointed).
    ``passes`` (int32 scalar, may be traced; None = n): the sleeping examples run min(passes, n) passes. The scan
    keeps its n steps and a ``lax.cond`` skips the steps no example runs, so one compiled call serves every N up
    to n (N-robust training samples it per step). ``cfg.sleep_tol`` > 0 (adaptive depth): an example also stops
    after the first pass that changes its fast weights by less than sleep_tol relative to the pass before (the
    wake pass always runs; gradients flow through exactly the passes taken).
    Returns (h, state, context_kv): context_kv holds every attention layer's keys/values of the WAKE pass (the first;
    sliding eviction keeps those for the next window, the one place this choice is made), () under hard eviction.
    ``return_taken``: also the passes each example ran [B] int32.
    """
    cfg = params.config
    lo, hi = cfg.sleep_layer_range
    depth = len(cfg.stack)
    sliding = context is not None
    run = functools.partial(layers_pass, params, span=layers.Span(valid=valid))
    h, carries = run(h, _window_carries(params, h, state, context), lo=0, hi=lo)

    def one_pass(h, carries, i, keep):
        h_in = h
        if cfg.norm_between_passes:  # a looped model: each sleep pass is more loops, each from a normalised stream
            h_in = jnp.where(i > 0, layers.norm(h, params.final_norm, cfg), h)
        return _after_pass(i, keep, h, carries, *run(h_in, carries, lo=lo, hi=hi))

    # Remat where it pays: a pass checkpoint keeps only the pass's input until the backward. Under "both" the
    # window checkpoint already does that for a window of one pass, and the last window's single pass is
    # differentiated right after it runs: there a pass checkpoint would only recompute.
    if cfg.remat in ("pass", "both") and (n > 1 or (cfg.remat == "pass" and not last)):
        one_pass = jax.checkpoint(one_pass)

    # Dynamic depth (a traced pass count, or adaptive stopping): ``active`` [B] marks the examples still sleeping.
    dynamic = n > 1 and (passes is not None or cfg.sleep_tol > 0)
    limit = jnp.clip(jnp.asarray(n if passes is None else passes, jnp.int32), 1, n)
    batch = h.shape[0]

    def body(carry, i):
        h, carries, h_wake, active, taken = carry
        if dynamic:
            moving = active & (i < limit) if sleeps is None else active & sleeps & (i < limit)
            keep = moving | (i == 0)
            h, new = jax.lax.cond((i == 0) | jnp.any(moving), lambda: one_pass(h, carries, i, keep),
                                  lambda: (h, carries))
            if cfg.sleep_tol > 0:  # stop where the fast weights have settled (never after the wake pass)
                active = active & ((i == 0) | (_fast_change(carries, new, lo, hi, cfg, batch) >= cfg.sleep_tol))
            taken = taken + keep.astype(jnp.int32)
        else:
            keep = None if sleeps is None else sleeps | (i == 0)
            h, new = one_pass(h, carries, i, keep)
        # What the passes never write (the contexts, the layers outside sleep_layers) goes back to the scan as its own
        # input, so the scan sees constants; else the backward keeps a copy per pass (measured +13% of the temporaries
        # of a sliding-eviction train step).
        carries = tuple(n._replace(context=c.context) if lo <= j < hi else c
                        for j, (n, c) in enumerate(zip(new, carries)))
        if h_wake is not None:
            h_wake = jnp.where(i == 0, h, h_wake)
        return (h, carries, h_wake, active, taken), None

    # Sliding eviction keeps the wake pass's keys/values of the layers after the sleep layers too: those layers
    # then also run once on the first pass's output (their fast weights from that run are discarded).
    suffix_attention = any(kind in ATTENTION_KINDS for kind in cfg.stack[hi:])
    h_wake = h if sliding and suffix_attention and n > 1 else None
    init = (h, carries, h_wake, jnp.ones((batch,), bool), jnp.zeros((batch,), jnp.int32))
    (h, carries, h_wake, _, taken), _ = jax.lax.scan(body, init, jnp.arange(n))
    if not dynamic:
        taken = jnp.full((batch,), n, jnp.int32) if sleeps is None else jnp.where(sleeps, n, 1)
    if h_wake is not None:
        _, wake = run(h_wake, carries, lo=hi, hi=depth)
        h, carries = run(h, carries, lo=hi, hi=depth)
        carries = tuple(c._replace(kv=w.kv) for c, w in zip(carries, wake))
    else:
        h, carries = run(h, carries, lo=hi, hi=depth)
    state = tuple(c.fast for c in of_kind(cfg, carries, "gdn"))
    out = h, state, tuple(c.kv for c in of_kind(cfg, carries, "attn")) if sliding else ()
    return (*out, taken) if return_taken else out


def _check_context(context, params: Params, batch_size: int):
    cfg = params.config
    if context is None:
        return None
    if cfg.eviction != "sliding":
        raise ValueError("context (the previous window's keys/values) is only used with eviction='sliding'")
    expected = (batch_size, cfg.window, cfg.attn_kv_heads, cfg.attn_head_dim)
    if not isinstance(context, tuple) or len(context) != cfg.num_attn_layers or any(
            len(kv) != 2 or tuple(kv[0].shape) != expected or tuple(kv[1].shape) != expected for kv in context):
        raise ValueError(f"context must be a tuple of {cfg.num_attn_layers} (k, v) pairs (one per attention layer), "
                         f"each {expected} [B, L, Hkv, D], as returned by window_kv")
    return tuple((k, v, jnp.asarray(True)) for k, v in context)


def consolidate(params: Params, state: FastWeights, ctx, *, n: int | None = None, context=None) -> FastWeights:
    """Sleep over one window: ``n`` (default ``config.sleep_n``) passes of the stack over ctx.

    ctx: int32 tokens [B, T] with 1 <= T <= window; state: fast weights (see ``init_state``).
    context (eviction='sliding' only): the previous window's keys/values (``window_kv``), which ctx's attention
    also sees; None: no previous window. Returns only the new fast weights; hidden states and KV are discarded.
    Pure: jit, grad and vmap apply.
    """
    cfg = params.config
    n = cfg.sleep_n if n is None else check_n(n)
    check_tokens("ctx", ctx, cfg, 2, "[B, T]")
    if not 1 <= ctx.shape[1] <= cfg.window:
        raise ValueError(f"ctx must hold 1 <= T <= window={cfg.window} tokens, got T={ctx.shape[1]}")
    check_state(state, params, ctx.shape[0])
    context = _check_context(context, params, ctx.shape[0])
    if cfg.eviction == "sliding" and context is None:
        context = _no_context(params, ctx.shape[0])
    return sleep(params, state, ctx, n, context)


def sleep(params: Params, state: FastWeights, ctx, n: int, context=None) -> FastWeights:
    """``consolidate`` without the input checks; context as run_passes takes it: (k, v, has_context) triples."""
    _, state, _ = run_passes(params, embed(params, ctx), state, n, context=context)
    return state


def _no_context(params: Params, batch_size: int):
    """The context of the first window (sliding eviction): nothing visible."""
    cfg = params.config
    shape = (batch_size, cfg.window, cfg.attn_kv_heads, cfg.attn_head_dim)
    zeros = jnp.zeros(shape, layers.dtype_of(cfg))
    return tuple((zeros, zeros, jnp.asarray(False)) for _ in range(cfg.num_attn_layers))


def window_kv(params: Params, ctx, state: FastWeights, context=None):
    """Sliding eviction: the keys (before RoPE) and values every attention layer keeps from window ctx [B, L]
    (those of its wake pass from ``state``), i.e. the ``context`` of the next window's ``consolidate``."""
    cfg = params.config
    if cfg.eviction != "sliding":
        raise ValueError("window_kv is only defined for eviction='sliding'")
    check_tokens("ctx", ctx, cfg, 2, "[B, T]")
    if ctx.shape[1] != cfg.window:
        raise ValueError(f"ctx must hold a full window of {cfg.window} tokens, got T={ctx.shape[1]}")
    check_state(state, params, ctx.shape[0])
    context = _check_context(context, params, ctx.shape[0]) or _no_context(params, ctx.shape[0])
    _, _, kv = run_passes(params, embed(params, ctx), state, 1, context=context)
    return kv


def _window(params: Params, carry, tokens, loss_mask, valid, targets, *, head, kind: str, last: bool = False,
            sleep_passes=None):
    """Algorithm 1 on one window of schedule letter ``kind``: an example sleeps (N passes) iff none of its
    positions is supervised, else wakes (one pass). Returns the carry and (``head(params, h, targets)`` of the
    window's final hidden states, the passes each example ran [B])."""
    cfg = params.config
    state, context = carry
    n, sleeps = cfg.sleep_n, None
    if kind == schedule_lib.WAKE or n == 1:
        n = 1
    elif kind == schedule_lib.MIXED:
        sleeps = ~jnp.any(loss_mask, axis=1)
    h, state, kv, passes = run_passes(params, embed(params, tokens), state, n, sleeps=sleeps, valid=valid,
                                      context=context, last=last, passes=sleep_passes if n > 1 else None,
                                      return_taken=True)
    if context is not None:
        context = tuple((k, v, jnp.asarray(True)) for k, v in kv)
    return (state, context), (head(params, h, targets), passes)


def _logits_head(params: Params, h, targets):
    return unembed(params, h)


# Logits per head chunk and example (float32 elements): a pretrained vocabulary (~150k) gets chunks of 128
# positions, a small task vocabulary one chunk per window.
HEAD_CHUNK_ELEMENTS = 1 << 25


def _stats_head(params: Params, h, targets):
    """Cross-entropy and greedy correctness [B, L] of a window's next-token predictions, from its hidden states
    [B, L, d], over chunks of positions: a window's [B, L, V] logits are never held at once, and the backward
    recomputes one chunk's at a time (with a pretrained vocabulary they were most of a train step's memory)."""
    B, L, _ = h.shape
    vocab = params.config.vocab_size
    chunk = min(L, 1 << max(4, int(math.log2(max(HEAD_CHUNK_ELEMENTS // vocab, 1)))))
    count = -(-L // chunk)
    pad = count * chunk - L
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(B, count, chunk, -1).swapaxes(0, 1)
    targets = jnp.pad(targets, ((0, 0), (0, pad))).reshape(B, count, chunk).swapaxes(0, 1)

    def one_chunk(params, h, targets):
        logits = unembed(params, h)
        return layers.softmax_cross_entropy(logits, targets), jnp.argmax(logits, axis=-1) == targets

    if count > 1:  # one chunk's backward follows its forward at once: nothing to save by recomputing it
        one_chunk = jax.checkpoint(one_chunk)
    ce, correct = jax.lax.map(lambda xs: one_chunk(params, *xs), (h, targets))
    return tuple(x.swapaxes(0, 1).reshape(B, count * chunk)[:, :L] for x in (ce, correct))


def resolve_schedule(cfg: ModelConfig, loss_mask, schedule: str | None = None) -> str:
    """The schedule a call runs (``sleepjax/schedule.py``). None: derived from a concrete (host) loss_mask, or M
    in every window when the mask is traced (right for any batch, N passes everywhere). A given schedule is checked
    against a concrete mask: one that does not fit raises, naming the window and the example."""
    T = loss_mask.shape[1]
    if schedule is None:
        return schedule_lib.derive(loss_mask, cfg.window) if _is_concrete(loss_mask) else schedule_lib.mixed(
            T, cfg.window)
    schedule_lib.check(schedule, T, cfg.window)
    if _is_concrete(loss_mask):
        bad = schedule_lib.misfits(schedule, loss_mask, cfg.window)
        if bad:
            raise ValueError(f"schedule {schedule!r} does not fit loss_mask: {bad[0][1]}")
    return schedule


def _segments(schedule: str) -> list[tuple[str, int, int]]:
    """Runs of equal letters: (kind, first window, end window)."""
    out: list[tuple[str, int, int]] = []
    for w, kind in enumerate(schedule):
        if out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1], w + 1)
        else:
            out.append((kind, w, w + 1))
    return out


def _scan_windows(params: Params, tokens, loss_mask, state, head, schedule: str | None, sleep_passes=None):
    """Algorithm 1 over the windows of tokens [B, T]: (the final fast weights, ``head``'s outputs [B, T, ...],
    the passes each example ran in each window [B, W]). ``sleep_passes``: see ``forward``."""
    cfg = params.config
    check_tokens("tokens", tokens, cfg, 2, "[B, T]")
    B, T = tokens.shape
    if not hasattr(loss_mask, "shape") or tuple(loss_mask.shape) != (B, T):
        raise ValueError(f"loss_mask must have shape {(B, T)} [B, T] like tokens, got {getattr(loss_mask, 'shape', None)}")
    schedule = resolve_schedule(cfg, loss_mask, schedule)
    state = init_state(params, B) if state is None else state
    check_state(state, params, B)

    # A short last window is padded to a full one: attention and the conv are causal, and padded tokens leave
    # the fast weights untouched, so real positions are unaffected; windows of one letter share a compiled body.
    L = cfg.window
    num_windows = len(schedule)
    pad = num_windows * L - T
    tokens = jnp.asarray(tokens, jnp.int32)
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, pad + 1)))  # position t predicts token t + 1
    tokens = jnp.pad(tokens, ((0, 0), (0, pad)))
    loss_mask = jnp.pad(jnp.asarray(loss_mask, bool), ((0, 0), (0, pad)))
    valid = jnp.arange(num_windows * L) < T
    by_window = lambda x: x.reshape(B, num_windows, L).swapaxes(0, 1)
    windows = (by_window(tokens), by_window(loss_mask), valid.reshape(num_windows, L), by_window(targets))
    carry = (state, _no_context(params, B) if cfg.eviction == "sliding" else None)

    # Each run of equal schedule letters is one scan whose body runs exactly the passes its letter needs. At N = 1
    # every letter means one pass: one scan over all windows (split scans measured 1.7x the temporaries there).
    outs = []
    for kind, first, end in _segments(schedule_lib.WAKE * num_windows if cfg.sleep_n == 1 else schedule):
        last = end == num_windows and end - first == 1  # a lone last window: no checkpoint pays off there
        window_fn = functools.partial(_window, head=head, kind=kind, last=last, sleep_passes=sleep_passes)
        if cfg.remat in ("window", "both") and not last:
            window_fn = jax.checkpoint(window_fn)
        xs = tuple(x[first:end] for x in windows)
        carry, out = jax.lax.scan(lambda c, xs: window_fn(params, c, *xs), carry, xs)
        outs.append(out)
    out, passes = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *outs)  # [num_windows, B, ...] leaves
    out = jax.tree_util.tree_map(lambda x: x.swapaxes(0, 1).reshape(B, num_windows * L, *x.shape[3:])[:, :T], out)
    return carry[0], out, passes.T


def forward(params: Params, tokens, loss_mask, state: FastWeights | None = None, *, return_state: bool = False,
            schedule: str | None = None, sleep_passes=None):
    """Algorithm 1 over tokens [B, T] split into windows of ``config.window`` (the last may be shorter).

    loss_mask [B, T] bool: position t's prediction (of token t+1) is supervised. Each example decides for itself:
    its window is consolidated with N passes iff none of its own positions there is supervised, else it gets one;
    no example's outputs depend on the others in its batch. ``schedule`` (one letter per window, see
    ``sleepjax/schedule.py``) only sets what the compiled call costs: None derives it from a concrete loss_mask
    (under jit, a traced mask gets M everywhere: N passes for every window; pass the schedule to do better).
    Returns logits [B, T, V] float32 (in a consolidation window, those of its last pass), plus the final fast
    weights if ``return_state``. ``state`` defaults to zeros (S is zero once per sequence). Under sliding
    eviction every window's attention also sees the previous window's wake-pass keys/values (the first none).
    Training and evaluation use ``token_stats``, which never holds the [B, T, V] logits. ``sleep_passes`` (int32
    scalar, may be traced): sleeping windows run min(sleep_passes, N) passes, compiled once for all of them (N is
    then the most); ``config.sleep_tol`` > 0 lets each example stop earlier (``run_passes``).
    """
    state, logits, _ = _scan_windows(params, tokens, loss_mask, state, _logits_head, schedule, sleep_passes)
    return (logits, state) if return_state else logits


def token_stats(params: Params, tokens, loss_mask, *, schedule: str | None = None, return_passes: bool = False,
                sleep_passes=None):
    """``token_losses(forward(params, tokens, loss_mask), tokens, loss_mask)`` without the [B, T, V] logits: the
    per-position cross-entropy, greedy correctness and mask, each [B, T-1], computed window by window in chunks
    of positions (see ``_stats_head``). ``return_passes``: also the passes each example ran per window [B, W]."""
    _, (ce, correct), passes = _scan_windows(params, tokens, loss_mask, None, _stats_head, schedule, sleep_passes)
    out = ce[:, :-1], correct[:, :-1], jnp.asarray(loss_mask)[:, :-1].astype(jnp.float32)
    return (*out, passes) if return_passes else out


SLEEP_COUNTS = ("should_sleep", "slept", "slept_supervised")


def _supervised_windows(cfg: ModelConfig, loss_mask, num_windows: int) -> jax.Array:
    """bool [B, W]: the example-windows holding a supervised position (loss_mask [B, T])."""
    B, T = loss_mask.shape
    mask = jnp.pad(jnp.asarray(loss_mask, bool), ((0, 0), (0, num_windows * cfg.window - T)))
    return mask.reshape(B, num_windows, cfg.window).any(axis=2)


def sleep_counts(cfg: ModelConfig, loss_mask, passes, sleep_passes=None) -> dict[str, jax.Array]:
    """Example-windows (loss_mask [B, T], passes [B, W] as ``token_stats`` returns them): ``should_sleep`` (no
    supervised position), ``slept`` (of those, the ones that slept: N passes, or at N = 1 the one pass; with
    ``sleep_passes`` or adaptive depth, N is what the call allowed and an example may stop after 2) and
    ``slept_supervised`` (supervised ones that ran more than one pass: never, unless a schedule was wrong). Sums,
    so they add over batches."""
    supervised = _supervised_windows(cfg, loss_mask, passes.shape[1])
    due = jnp.clip(jnp.asarray(cfg.sleep_n if sleep_passes is None else sleep_passes), 1, cfg.sleep_n)
    slept = passes >= jnp.minimum(due, 2) if cfg.sleep_tol > 0 else passes == due
    return {"should_sleep": jnp.sum(~supervised), "slept": jnp.sum(~supervised & slept),
            "slept_supervised": jnp.sum(supervised & (passes > 1))}


def pass_histogram(cfg: ModelConfig, loss_mask, passes) -> jax.Array:
    """How many passes the example-windows with no supervised position ran (loss_mask [B, T], passes [B, W] as
    ``token_stats`` returns them): int32 [sleep_n], entry p - 1 counting the windows that ran p passes. With
    adaptive depth (``sleep_tol``) it is where each window stopped; otherwise every count sits at N (or at the
    ``sleep_passes`` of the call). A sum, so it adds over batches."""
    sleeping = ~_supervised_windows(cfg, loss_mask, passes.shape[1])
    values = jnp.arange(1, cfg.sleep_n + 1)
    return jnp.sum((passes[..., None] == values) & sleeping[..., None], axis=(0, 1)).astype(jnp.int32)


def pass_summary(histogram) -> dict[str, float]:
    """``passes_mean`` and ``passes_hist/<p>`` (the fraction of sleeping example-windows that ran p passes, p = 1..N)
    from a ``pass_histogram`` (summed over batches); {} when no window slept."""
    histogram = np.asarray(histogram, np.float64)
    total = histogram.sum()
    if not total:
        return {}
    out = {"passes_mean": float(np.dot(np.arange(1, len(histogram) + 1), histogram) / total)}
    out.update({f"passes_hist/{p}": float(c / total) for p, c in enumerate(histogram, start=1)})
    return out


def slept_fraction(counts) -> float:
    """Of the example-windows that should have slept, the fraction that did (1.0 when none should have)."""
    should = float(counts["should_sleep"])
    return float(counts["slept"]) / should if should else 1.0


def layer_passes(cfg: ModelConfig, loss_mask, schedule: str | None = None) -> int:
    """Layer-window passes the compiled step runs per example for this loss_mask [B, T] (host array) and schedule
    (default: derived from the mask): a W window costs one pass of every layer, an S or M window the layers
    before ``sleep_layers`` once, the sleep layers N times and the rest once. The ratio of two configs' counts is
    their ratio of training FLOPs, up to attention's window-size term (matmuls of the projections and MLPs
    dominate at the sizes used here)."""
    schedule = resolve_schedule(cfg, np.asarray(loss_mask, bool), schedule)
    wakes = schedule.count(schedule_lib.WAKE)
    lo, hi = cfg.sleep_layer_range
    depth = len(cfg.stack)
    return wakes * depth + (len(schedule) - wakes) * (depth - (hi - lo) + cfg.sleep_n * (hi - lo))


def token_losses(logits, tokens, loss_mask):
    """Per-position cross-entropy and correctness of next-token predictions. Shapes [B, T-1]."""
    targets = tokens[:, 1:]
    logits = logits[:, :-1]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    correct = jnp.argmax(logits, axis=-1) == targets
    return ce, correct, loss_mask[:, :-1].astype(jnp.float32)


def loss(params: Params, tokens, loss_mask, *, schedule: str | None = None,
         sleep_passes=None) -> tuple[jax.Array, dict[str, Any]]:
    """Masked mean next-token cross-entropy of Algorithm 1, with token accuracy and ``sleep_counts``. Returns
    (loss, metrics). ``schedule``, ``sleep_passes``: as in ``forward``."""
    ce, correct, mask, passes = token_stats(params, tokens, loss_mask, schedule=schedule, return_passes=True,
                                            sleep_passes=sleep_passes)
    count = jnp.maximum(mask.sum(), 1.0)
    value = (ce * mask).sum() / count
    return value, {"loss": value, "accuracy": (correct * mask).sum() / count, "supervised": mask.sum(),
                   **sleep_counts(params.config, loss_mask, passes, sleep_passes)}
