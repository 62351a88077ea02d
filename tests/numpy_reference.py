"""An independent float64 NumPy reference of the sleepjax model, written from ../shared/method.md.

It shares nothing with ``sleepjax/layers.py``, ``sleepjax/model.py`` or ``kernels/``: it reads only the weights,
by name, from the ``Params`` pytree (that is the interface) and the ``ModelConfig``, and computes every step
itself, one sequence and one token at a time where the method states a recurrence. Conventions the method leaves
open are fixed here and named where they are used:

* a weight ``W`` of shape [in, out] maps x to ``x @ W``; head h of a projection is columns ``h*D:(h+1)*D``;
* RMSNorm(x) = x / sqrt(mean(x^2) + eps) * weight (``config.norm_eps``);
* RoPE rotates the pairs (i, i + D/2) ("rotate half") by ``position * theta**(-2i/D)``;
* grouped heads repeat: attention query head h reads key/value head ``h // (H / Hkv)``; GDN value head j reads
  query/key head ``j // (Hv / Hk)``;
* the GDN projection ``w_qkv`` holds q | k | v channels in that order; the causal depthwise conv's tap ``i`` (of K)
  multiplies the input ``K - 1 - i`` tokens back; L2 normalisation is x / sqrt(sum x^2 + 1e-6).

Pieces are plain functions (norm, MLP, RoPE, attention, conv, GDN, block, pass, window, Algorithm 1, stream) so
that new ``ModelConfig`` options can be modelled by adding one branch where they act; ``check_supported`` refuses
any config field this reference does not model unless it has its default value (today's behaviour).
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Fields whose effect is modelled below, or which do not change the mathematics (backends, precision, remat).
MODELLED_FIELDS = frozenset({
    "vocab_size", "d_model", "layers", "attn_heads", "attn_kv_heads", "attn_head_dim", "gdn_heads",
    "gdn_value_heads", "gdn_key_dim", "gdn_value_dim", "conv_size", "mlp_dim", "window", "sleep_n", "ssm_rule",
    "rope_theta", "norm_eps",
    "dtype", "remat", "gdn_backend", "attn_backend", "chunk_size",
})
L2_EPS = 1e-6


def check_supported(cfg) -> None:
    """Raises NotImplementedError for a config option the reference does not model (unless at its default)."""
    for field in dataclasses.fields(cfg):
        if field.name in MODELLED_FIELDS:
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if getattr(cfg, field.name) != default:
            raise NotImplementedError(f"numpy_reference does not model ModelConfig.{field.name}="
                                      f"{getattr(cfg, field.name)!r}; add it here first")
    if cfg.ssm_rule not in ("delta", "hebbian"):
        raise NotImplementedError(f"ssm_rule={cfg.ssm_rule!r}")


class Weights:
    """The model's weights as float64 NumPy arrays (read by name from the Params pytree) plus its config."""

    def __init__(self, params):
        self.cfg = params.config
        check_supported(self.cfg)
        f64 = lambda x: np.asarray(x, dtype=np.float64)
        self.embed = f64(params.embed)
        self.final_norm = f64(params.final_norm)
        self.unembed = f64(params.unembed)
        self.layers = [{k: ({kk: f64(vv) for kk, vv in v.items()} if isinstance(v, dict) else f64(v))
                        for k, v in layer.items()} for layer in params.layers]


# ---------------------------------------------------------------------------------------------------------------
# Elementwise pieces


def silu(x):
    return x / (1.0 + np.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softplus(x):
    return np.logaddexp(0.0, x)


def rms_norm(x, weight, eps):
    """Over the last axis."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def l2_normalize(x):
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + L2_EPS)


def swiglu_mlp(p, x):
    """x [T, d]: (SiLU(x W_gate) * (x W_up)) W_down."""
    return (silu(x @ p["w_gate"]) * (x @ p["w_up"])) @ p["w_down"]


# ---------------------------------------------------------------------------------------------------------------
# Attention (window-local, causal, RoPE from the window start, grouped heads)


def rope(x, positions, theta):
    """x [T, D] (one head), positions [T]: rotate the pairs (i, i + D/2) by position * theta**(-2i/D)."""
    D = x.shape[-1]
    half = D // 2
    out = np.empty_like(x)
    for i in range(half):
        angle = positions * theta ** (-2.0 * i / D)
        c, s = np.cos(angle), np.sin(angle)
        out[:, i] = x[:, i] * c - x[:, i + half] * s
        out[:, i + half] = x[:, i] * s + x[:, i + half] * c
    return out


def attention(p, x, cfg):
    """x [T, d] (the normalised block input of ONE window) -> [T, d]. Positions 0..T-1 from the window start;
    query t sees keys 0..t of this window only."""
    T = x.shape[0]
    H, Hkv, D = cfg.attn_heads, cfg.attn_kv_heads, cfg.attn_head_dim
    positions = np.arange(T, dtype=np.float64)
    q_all, k_all, v_all = x @ p["wq"], x @ p["wk"], x @ p["wv"]
    heads = []
    for h in range(H):
        g = h // (H // Hkv)
        q = rope(q_all[:, h * D:(h + 1) * D], positions, cfg.rope_theta)
        k = rope(k_all[:, g * D:(g + 1) * D], positions, cfg.rope_theta)
        v = v_all[:, g * D:(g + 1) * D]
        out = np.zeros((T, D))
        for t in range(T):
            scores = k[:t + 1] @ q[t] / np.sqrt(D)
            weights = np.exp(scores - scores.max())
            out[t] = (weights / weights.sum()) @ v[:t + 1]
        heads.append(out)
    return np.concatenate(heads, axis=-1) @ p["wo"]


# ---------------------------------------------------------------------------------------------------------------
# Gated DeltaNet


def causal_depthwise_conv(u, w):
    """u [T, C], w [K, C]: y_t = sum_j w[K-1-j] * u_{t-j} over j with t - j >= 0 (nothing before the window)."""
    T, K = u.shape[0], w.shape[0]
    y = np.zeros_like(u)
    for t in range(T):
        for j in range(K):
            if t - j >= 0:
                y[t] += w[K - 1 - j] * u[t - j]
    return y


def gdn_update(S, q, k, v, g, beta, rule):
    """One token of one value head. S [Dk, Dv]; q, k [Dk] (normalised, q unscaled); v [Dv]; g, beta scalars.

    delta:   S_t = exp(g) S + k (beta (v - exp(g) S^T k))^T
    hebbian: S_t = exp(g) S + beta k v^T
    o_t = S_t^T (q * Dk**-0.5). Returns (o [Dv], S_t)."""
    a = np.exp(g)
    if rule == "delta":
        S = a * S + np.outer(k, beta * (v - a * (S.T @ k)))
    else:
        S = a * S + beta * np.outer(k, v)
    return S.T @ (q / np.sqrt(q.shape[0])), S


def gdn(p, x, S, cfg):
    """x [T, d] (normalised block input of one window), S [Hv, Dk, Dv] -> (out [T, d], S)."""
    T = x.shape[0]
    Hk, Hv, Dk, Dv = cfg.gdn_heads, cfg.gdn_value_heads, cfg.gdn_key_dim, cfg.gdn_value_dim
    y = silu(causal_depthwise_conv(x @ p["w_qkv"], p["conv"]))
    q_all, k_all, v_all = y[:, :Hk * Dk], y[:, Hk * Dk:2 * Hk * Dk], y[:, 2 * Hk * Dk:]
    assert v_all.shape[1] == Hv * Dv
    g = -np.exp(p["a_log"]) * softplus(x @ p["w_a"] + p["dt_bias"])  # [T, Hv], log decay <= 0
    beta = sigmoid(x @ p["w_b"])  # [T, Hv]
    gate = silu(x @ p["w_gate"])  # [T, Hv*Dv]
    S = np.array(S, dtype=np.float64, copy=True)
    o = np.zeros((T, Hv, Dv))
    for j in range(Hv):
        i = j // (Hv // Hk)
        q = l2_normalize(q_all[:, i * Dk:(i + 1) * Dk])
        k = l2_normalize(k_all[:, i * Dk:(i + 1) * Dk])
        v = v_all[:, j * Dv:(j + 1) * Dv]
        for t in range(T):
            o[t, j], S[j] = gdn_update(S[j], q[t], k[t], v[t], g[t, j], beta[t, j], cfg.ssm_rule)
    gated = rms_norm(o, p["o_norm"], cfg.norm_eps) * gate.reshape(T, Hv, Dv)
    return gated.reshape(T, Hv * Dv) @ p["wo"], S


# ---------------------------------------------------------------------------------------------------------------
# Blocks, passes, windows


def block(kind, p, h, S, cfg):
    """Pre-norm residual block: h += mixer(RMSNorm(h)); h += MLP(RMSNorm(h)). h [T, d]; S for GDN blocks."""
    x = rms_norm(h, p["norm1"], cfg.norm_eps)
    if kind == "attn":
        h = h + attention(p, x, cfg)
    else:
        out, S = gdn(p, x, S, cfg)
        h = h + out
    h = h + swiglu_mlp(p["mlp"], rms_norm(h, p["norm2"], cfg.norm_eps))
    return h, S


def blocks_pass(w: Weights, h, states):
    """One pass of the whole stack over one window of one sequence. states: list of [Hv, Dk, Dv] per GDN layer."""
    states, out, i = list(states), [], 0
    for kind, p in zip(w.cfg.layers, w.layers):
        if kind == "gdn":
            h, s = block(kind, p, h, states[i], w.cfg)
            out.append(s)
            i += 1
        else:
            h, _ = block(kind, p, h, None, w.cfg)
    return h, out


def logits_of(w: Weights, h):
    return rms_norm(h, w.final_norm, w.cfg.norm_eps) @ w.unembed


def zero_states(w: Weights, batch_size: int):
    """[b][layer] -> float64 [Hv, Dk, Dv] zeros."""
    c = w.cfg
    return [[np.zeros((c.gdn_value_heads, c.gdn_key_dim, c.gdn_value_dim)) for _ in range(c.num_gdn_layers)]
            for _ in range(batch_size)]


def states_from_jax(state):
    """sleepjax fast weights (tuple over layers of [B, Hv, Dk, Dv]) -> [b][layer] float64."""
    arrays = [np.asarray(s, np.float64) for s in state]
    return [[a[b] for a in arrays] for b in range(arrays[0].shape[0])]


def states_to_layers(states):
    """[b][layer] -> list over layers of [B, Hv, Dk, Dv] (comparable with sleepjax's tuple)."""
    return [np.stack([states[b][i] for b in range(len(states))]) for i in range(len(states[0]))]


def run_window(w: Weights, tokens, states, passes: int):
    """``passes`` passes over one window for every sequence. tokens [B, T] (T <= window). Pass n consumes pass
    n-1's hidden states and continues from the S it ended with. Returns (logits of the last pass [B, T, V],
    states)."""
    logits, new_states = [], []
    for b in range(tokens.shape[0]):
        h, s = w.embed[tokens[b]], states[b]
        for _ in range(passes):
            h, s = blocks_pass(w, h, s)
        logits.append(logits_of(w, h))
        new_states.append(s)
    return np.stack(logits), new_states


def consolidate(w: Weights, states, ctx, n: int):
    """Sleep: n passes over ctx [B, T]; only the fast weights survive."""
    return run_window(w, np.asarray(ctx), states, n)[1]


def algorithm1(w: Weights, tokens, loss_mask, states=None):
    """Algorithm 1. tokens, loss_mask [B, T]; windows of ``window`` tokens, the last one shorter if T is not a
    multiple. A window sleeps (N passes) iff no example of the batch supervises any of its positions; otherwise
    it wakes (one pass). Returns (logits [B, T, V], final states [b][layer])."""
    tokens, loss_mask = np.asarray(tokens), np.asarray(loss_mask, bool)
    B, T = tokens.shape
    L, N = w.cfg.window, w.cfg.sleep_n
    states = zero_states(w, B) if states is None else states
    logits = []
    for start in range(0, T, L):
        supervised = loss_mask[:, start:start + L].any()
        out, states = run_window(w, tokens[:, start:start + L], states, 1 if supervised else N)
        logits.append(out)
    return np.concatenate(logits, axis=1), states


def stream(w: Weights, tokens):
    """Streaming wake: token t's logits come from one pass over the current window's tokens so far, starting
    from the S saved at the window's start; every full window is consolidated with N passes from that S.
    Returns (logits [B, T, V], fast weights after the last token [b][layer], sleeps)."""
    tokens = np.asarray(tokens)
    B, T = tokens.shape
    L, N = w.cfg.window, w.cfg.sleep_n
    start_states = zero_states(w, B)
    logits, current, sleeps = [], start_states, 0
    for start in range(0, T, L):
        window = tokens[:, start:start + L]
        out, current = run_window(w, window, start_states, 1)  # causal: the prefix outputs are the stream's
        logits.append(out)
        if window.shape[1] == L:
            start_states = current = consolidate(w, start_states, window, N)
            sleeps += 1
    return np.concatenate(logits, axis=1), current, sleeps


def masked_loss(logits, tokens, loss_mask):
    """Mean next-token cross-entropy over supervised positions (position t predicts token t+1)."""
    tokens, mask = np.asarray(tokens), np.asarray(loss_mask, bool)[:, :-1]
    z = logits[:, :-1]
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    return float((ce * mask).sum() / max(mask.sum(), 1))
