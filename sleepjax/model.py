"""The hybrid model and Algorithm 1: parameters, fast weights, consolidation (sleep) and the windowed forward.

Only the fast weights (every GDN layer's S, float32) cross a window boundary. A consolidation window runs the
block stack ``sleep_n`` times, pass n consuming pass n-1's hidden states and every GDN layer continuing from the
S the previous pass ended with; a supervised (wake) window runs it once.
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
from sleepjax.config import ModelConfig

FastWeights = tuple  # one float32 [B, Hv, Dk, Dv] array per GDN layer, in layer order


@flax.struct.dataclass
class Params:
    """Model parameters (float32). ``layers[i]`` is layer i's dict; ``config`` is static pytree metadata,
    so every function below needs nothing but ``params``."""

    embed: jax.Array  # [V, d]
    layers: tuple  # dicts, one per layer
    final_norm: jax.Array  # [d]
    unembed: jax.Array  # [d, V]
    config: ModelConfig = flax.struct.field(pytree_node=False)


# ---------------------------------------------------------------------------------------------------------------
# Initialisation


def _normal(key, shape, fan_in):
    return jax.random.normal(key, shape, jnp.float32) / math.sqrt(fan_in)


def _init_mlp(key, cfg: ModelConfig):
    k1, k2, k3 = jax.random.split(key, 3)
    d, f = cfg.d_model, cfg.mlp_dim
    return {"w_gate": _normal(k1, (d, f), d), "w_up": _normal(k2, (d, f), d), "w_down": _normal(k3, (f, d), f)}


def _init_attention(key, cfg: ModelConfig):
    k = jax.random.split(key, 5)
    d, hd = cfg.d_model, cfg.attn_head_dim
    return {
        "norm1": jnp.ones((d,)),
        "wq": _normal(k[0], (d, cfg.attn_heads * hd), d),
        "wk": _normal(k[1], (d, cfg.attn_kv_heads * hd), d),
        "wv": _normal(k[2], (d, cfg.attn_kv_heads * hd), d),
        "wo": _normal(k[3], (cfg.attn_heads * hd, d), cfg.attn_heads * hd),
        "norm2": jnp.ones((d,)),
        "mlp": _init_mlp(k[4], cfg),
    }


def _init_gdn(key, cfg: ModelConfig):
    k = jax.random.split(key, 9)
    d, hv, dv = cfg.d_model, cfg.gdn_value_heads, cfg.gdn_value_dim
    channels = layers.gdn_conv_channels(cfg)
    # Decay rates as in Mamba-2 / GDN: A in [1, 16], dt log-uniform in [1e-3, 0.1] (stored as softplus^-1).
    a = jax.random.uniform(k[0], (hv,), minval=1.0, maxval=16.0)
    dt = jnp.exp(jax.random.uniform(k[1], (hv,), minval=math.log(1e-3), maxval=math.log(0.1)))
    return {
        "norm1": jnp.ones((d,)),
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
        "norm2": jnp.ones((d,)),
        "mlp": _init_mlp(k[8], cfg),
    }


def init(config: ModelConfig, key) -> Params:
    """Fresh float32 parameters for ``config``."""
    if not isinstance(config, ModelConfig):
        raise ValueError(f"config must be a ModelConfig, got {type(config).__name__}")
    keys = jax.random.split(key, len(config.layers) + 2)
    blocks = tuple((_init_attention if kind == "attn" else _init_gdn)(keys[i], config)
                   for i, kind in enumerate(config.layers))
    return Params(
        embed=jax.random.normal(keys[-2], (config.vocab_size, config.d_model), jnp.float32),
        layers=blocks,
        final_norm=jnp.ones((config.d_model,)),
        unembed=_normal(keys[-1], (config.d_model, config.vocab_size), config.d_model),
        config=config,
    )


def init_state(params: Params, batch_size: int) -> FastWeights:
    """Zero fast weights for ``batch_size`` sequences: one float32 [B, Hv, Dk, Dv] per GDN layer."""
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    cfg = params.config
    shape = (int(batch_size), cfg.gdn_value_heads, cfg.gdn_key_dim, cfg.gdn_value_dim)
    return tuple(jnp.zeros(shape, jnp.float32) for _ in range(cfg.num_gdn_layers))


# Logical axis names of every weight, by (block kind, name). "embed" is the model dimension (FSDP shards it),
# "heads" a dimension made of whole attention or GDN value heads and "mlp" the MLP hidden dimension (tensor
# parallelism shards them); None is never sharded. The fused GDN q|k|v projection and its conv are not split over
# heads: their channels interleave three head layouts.
_LOGICAL_AXES = {
    "embed": ("vocab", "embed"), "unembed": ("embed", "vocab"), "final_norm": (None,),
    "norm1": (None,), "norm2": (None,), "w_up": ("embed", "mlp"), "w_down": ("mlp", "embed"),
    ("attn", "wq"): ("embed", "heads"), ("attn", "wk"): ("embed", "heads"), ("attn", "wv"): ("embed", "heads"),
    ("attn", "wo"): ("heads", "embed"),
    ("gdn", "w_qkv"): ("embed", None), ("gdn", "conv"): (None, None), ("gdn", "w_a"): ("embed", None),
    ("gdn", "w_b"): ("embed", None), ("gdn", "a_log"): (None,), ("gdn", "dt_bias"): (None,),
    ("gdn", "w_gate"): ("embed", "heads"), ("gdn", "o_norm"): (None,), ("gdn", "wo"): ("heads", "embed"),
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
    kind = "mlp" if "mlp" in names else config.layers[names[1]]
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
    expected = (batch_size, cfg.gdn_value_heads, cfg.gdn_key_dim, cfg.gdn_value_dim)
    if not isinstance(state, tuple) or len(state) != cfg.num_gdn_layers:
        raise ValueError(f"state must be a tuple of {cfg.num_gdn_layers} fast weights (one per GDN layer, see "
                         f"init_state), got {type(state).__name__} of length {len(state) if hasattr(state, '__len__') else '?'}")
    for i, s in enumerate(state):
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
    return layers.rms_norm(h, params.final_norm, cfg.norm_eps).astype(jnp.float32) @ params.unembed


def blocks_pass(params: Params, h, state: FastWeights, valid=None):
    """One pass of the whole stack over a window. h [B, T, d] -> (h, state). ``valid`` [T] bool marks real
    tokens; padding (False) leaves the fast weights untouched."""
    cfg = params.config
    new_state, gdn_index = [], 0
    for kind, p in zip(cfg.layers, params.layers):
        x = layers.rms_norm(h, p["norm1"], cfg.norm_eps)
        if kind == "attn":
            h = h + layers.attention_window(p, x, cfg)
        else:
            out, s = layers.gdn_window(p, x, state[gdn_index], cfg, valid)
            h, gdn_index = h + out, gdn_index + 1
            new_state.append(s)
        h = h + layers.mlp(p["mlp"], layers.rms_norm(h, p["norm2"], cfg.norm_eps))
    return h, tuple(new_state)


def run_passes(params: Params, h, state: FastWeights, n: int, *, active=None, valid=None):
    """``n`` passes as a ``lax.scan`` (compile time stays flat in n). Returns the last pass's (h, state).

    ``active`` (traced int32, optional): only the first ``active`` passes run, the rest pass the carry through.
    One scan then serves both wake (active = 1) and sleep (active = n), so the block stack is compiled once.
    """
    step = functools.partial(blocks_pass, valid=valid)
    if params.config.remat in ("pass", "both"):
        step = jax.checkpoint(step)

    def body(carry, i):
        if active is None:
            return step(params, *carry), None
        return jax.lax.cond(i < active, lambda c: step(params, *c), lambda c: c, carry), None

    (h, state), _ = jax.lax.scan(body, (h, state), jnp.arange(n))
    return h, state


def consolidate(params: Params, state: FastWeights, ctx, *, n: int | None = None) -> FastWeights:
    """Sleep over one window: ``n`` (default ``config.sleep_n``) passes of the stack over ctx.

    ctx: int32 tokens [B, T] with 1 <= T <= window; state: fast weights (see ``init_state``).
    Returns only the new fast weights; hidden states and KV are discarded. Pure: jit, grad and vmap apply.
    """
    cfg = params.config
    n = cfg.sleep_n if n is None else check_n(n)
    check_tokens("ctx", ctx, cfg, 2, "[B, T]")
    if not 1 <= ctx.shape[1] <= cfg.window:
        raise ValueError(f"ctx must hold 1 <= T <= window={cfg.window} tokens, got T={ctx.shape[1]}")
    check_state(state, params, ctx.shape[0])
    _, state = run_passes(params, embed(params, ctx), state, n)
    return state


def _window(params: Params, state: FastWeights, tokens, loss_mask, valid):
    """Algorithm 1 on one window: sleep (N passes) if no position is supervised, else wake (one pass)."""
    cfg = params.config
    active = None if cfg.sleep_n == 1 else jnp.where(jnp.any(loss_mask), 1, cfg.sleep_n)
    h, state = run_passes(params, embed(params, tokens), state, cfg.sleep_n, active=active, valid=valid)
    return state, unembed(params, h)


def forward(params: Params, tokens, loss_mask, state: FastWeights | None = None, *, return_state: bool = False):
    """Algorithm 1 over tokens [B, T] split into windows of ``config.window`` (the last may be shorter).

    loss_mask [B, T] bool: position t's prediction (of token t+1) is supervised. A window with no supervised
    position in any example is consolidated with N passes; any other window gets one. Returns logits
    [B, T, V] float32 (in a consolidation window, those of its last pass), plus the final fast weights if
    ``return_state``. ``state`` defaults to zeros (S is zero once per sequence).
    """
    cfg = params.config
    check_tokens("tokens", tokens, cfg, 2, "[B, T]")
    B, T = tokens.shape
    if not hasattr(loss_mask, "shape") or tuple(loss_mask.shape) != (B, T):
        raise ValueError(f"loss_mask must have shape {(B, T)} [B, T] like tokens, got {getattr(loss_mask, 'shape', None)}")
    state = init_state(params, B) if state is None else state
    check_state(state, params, B)
    window_fn = _window
    if cfg.remat in ("window", "both"):
        window_fn = jax.checkpoint(_window)

    # A short last window is padded to a full one: attention and the conv are causal, and padded tokens leave
    # the fast weights untouched, so real positions are unaffected; every window then shares one compiled body.
    L = cfg.window
    num_windows = -(-T // L)
    pad = num_windows * L - T
    tokens = jnp.pad(jnp.asarray(tokens, jnp.int32), ((0, 0), (0, pad)))
    loss_mask = jnp.pad(jnp.asarray(loss_mask, bool), ((0, 0), (0, pad)))
    valid = jnp.arange(num_windows * L) < T
    windows = (tokens.reshape(B, num_windows, L).swapaxes(0, 1), loss_mask.reshape(B, num_windows, L).swapaxes(0, 1),
               valid.reshape(num_windows, L))

    def body(s, xs):
        return window_fn(params, s, *xs)

    state, logits = jax.lax.scan(body, state, windows)  # logits [num_windows, B, L, V]
    logits = logits.swapaxes(0, 1).reshape(B, num_windows * L, -1)[:, :T]
    return (logits, state) if return_state else logits


def token_losses(logits, tokens, loss_mask):
    """Per-position cross-entropy and correctness of next-token predictions. Shapes [B, T-1]."""
    targets = tokens[:, 1:]
    logits = logits[:, :-1]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    correct = jnp.argmax(logits, axis=-1) == targets
    return ce, correct, loss_mask[:, :-1].astype(jnp.float32)


def loss(params: Params, tokens, loss_mask) -> tuple[jax.Array, dict[str, Any]]:
    """Masked mean next-token cross-entropy of Algorithm 1, with token accuracy. Returns (loss, metrics)."""
    logits = forward(params, tokens, loss_mask)
    ce, correct, mask = token_losses(logits, tokens, loss_mask)
    count = jnp.maximum(mask.sum(), 1.0)
    value = (ce * mask).sum() / count
    return value, {"loss": value, "accuracy": (correct * mask).sum() / count, "supervised": mask.sum()}
