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

``gated_delta_rule`` (the token recurrence on [B, T, heads, dim] arrays, the kernels' contract) is also the one
float64 recurrence the kernel tests compare against.

Pieces are plain functions (norm, MLP, RoPE, attention, conv, GDN, block, pass, window, Algorithm 1, stream) so
that new ``ModelConfig`` options can be modelled by adding one branch where they act; ``check_supported`` refuses
any config field this reference does not model unless it has its default value (today's behaviour).

Options modelled beyond the defaults, from the ModelConfig docstring and method.md section 2:
* ``sleep_layers=(lo, hi)``: a window runs layers 0..lo-1 once, layers lo..hi-1 once (wake) or N times (sleep),
  layers hi.. once on the last pass's output;
* ``eviction="sliding"``: each window's attention also sees the keys/values that the previous window's WAKE pass
  (one pass of the whole stack from the fast weights at that window's start) produced, before RoPE; positions
  count from the previous window's start, and every query sees the L positions up to itself;
* ``attn_output_gate`` (each head's output times sigmoid(x W_q_gate)), ``qk_norm`` (RMSNorm over each q/k head
  before RoPE), ``rope_dim`` (only the first rope_dim dims of a head rotate), ``norm_weight_offset`` (block, final
  and q/k norms scale by offset + weight; not the GDN output norm), ``mlp_free_layers``, ``tie_embeddings``;
* ``attn_bias`` (q/k/v projections add ``bq``/``bk``/``bv``) and "swa" layers (attention whose query at position
  p sees only keys at positions > p - swa_window, on top of what the window / eviction leave visible);
* "jet" layers (JetBlock, from the Jet-Nemotron description in WORKSPACE.md): q, k = L2(SiLU(x W)), no conv;
  v = SiLU(y), y_t[c] = sum_j ker_t[c, j] u_{t-K+1+j}[c] with u = x W_v (zero before the window start) and the
  per-token kernel ker_t = (SiLU(x_t W1) W2 + b2) read channel-major as [C, K]; the same gated delta rule as GDN
  with H value heads = H key heads; output RMSNorm (eps ``jet_norm_eps``) * SiLU(x W_gate), then W_o.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Fields whose effect is modelled below, or which do not change the mathematics (backends, precision, remat).
MODELLED_FIELDS = frozenset({
    "vocab_size", "d_model", "layers", "attn_heads", "attn_kv_heads", "attn_head_dim", "gdn_heads",
    "gdn_value_heads", "gdn_key_dim", "gdn_value_dim", "conv_size", "mlp_dim", "window", "sleep_n", "ssm_rule",
    "rope_theta", "norm_eps", "eviction", "sleep_layers", "attn_output_gate", "qk_norm", "rope_dim",
    "norm_weight_offset", "mlp_free_layers", "tie_embeddings", "attn_bias", "swa_window", "jet_heads",
    "jet_key_dim", "jet_value_dim", "jet_conv_size", "jet_conv_reduction", "jet_norm_eps", "sandwich_norm_layers",
    "loop_steps",
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
    if cfg.ssm_rule not in ("delta", "hebbian") or cfg.eviction not in ("hard", "sliding"):
        raise NotImplementedError(f"ssm_rule={cfg.ssm_rule!r}, eviction={cfg.eviction!r}")


class Weights:
    """The model's weights as float64 NumPy arrays (read by name from the Params pytree) plus its config."""

    def __init__(self, params):
        self.cfg = params.config
        check_supported(self.cfg)
        f64 = lambda x: np.asarray(x, dtype=np.float64)
        self.embed = f64(params.embed)
        self.final_norm = f64(params.final_norm)
        self.unembed = self.embed.T if self.cfg.tie_embeddings else f64(params.unembed)
        self.layers = [{k: ({kk: f64(vv) for kk, vv in v.items()} if isinstance(v, dict) else f64(v))
                        for k, v in layer.items()} for layer in params.layers]
        # Ouro-style looping: the layer list run loop_steps times, loop t of layer l is run t * L + l with its own
        # KV cache / fast weights, and the final norm closes every loop but the last.
        self.runs = list(self.cfg.layers) * self.cfg.loop_steps
        self.attn_index = {}  # run -> its index among the attention runs (their kept keys/values)
        for i, kind in enumerate(self.runs):
            if kind in ("attn", "swa"):
                self.attn_index[i] = len(self.attn_index)


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


def model_norm(x, weight, cfg):
    """The block, final and q/k norms: scaled by norm_weight_offset + weight."""
    return rms_norm(x, cfg.norm_weight_offset + weight, cfg.norm_eps)


def l2_normalize(x):
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + L2_EPS)


def swiglu_mlp(p, x):
    """x [T, d]: (SiLU(x W_gate) * (x W_up)) W_down."""
    return (silu(x @ p["w_gate"]) * (x @ p["w_up"])) @ p["w_down"]


# ---------------------------------------------------------------------------------------------------------------
# Attention (window-local, causal, RoPE from the window start, grouped heads)


def rope(x, positions, theta, rope_dim=None):
    """x [T, D] (one head), positions [T]: rotate the pairs (i, i + R/2) by position * theta**(-2i/R) for
    i < R/2, R = rope_dim (default D); dims from R on are left as they are."""
    D = x.shape[-1] if rope_dim is None else rope_dim
    half = D // 2
    out = np.array(x, copy=True)
    for i in range(half):
        angle = positions * theta ** (-2.0 * i / D)
        c, s = np.cos(angle), np.sin(angle)
        out[:, i] = x[:, i] * c - x[:, i + half] * s
        out[:, i + half] = x[:, i] * s + x[:, i + half] * c
    return out


def attention(p, x, cfg, context=None, limit=None):
    """x [T, d] (the normalised block input of ONE window) -> (out [T, d], (k, v) of this window before RoPE,
    each [T, Hkv*D]). Hard eviction (context None): positions 0..T-1 from the window start and query t sees keys
    0..t. Sliding: context = (k, v) [L, Hkv*D] of the previous window, at positions 0..L-1, this window at L..;
    query t sees the L positions up to itself."""
    T = x.shape[0]
    H, Hkv, D = cfg.attn_heads, cfg.attn_kv_heads, cfg.attn_head_dim
    q_all, k_all, v_all = x @ p["wq"], x @ p["wk"], x @ p["wv"]
    if cfg.attn_bias:
        q_all, k_all, v_all = q_all + p["bq"], k_all + p["bk"], v_all + p["bv"]
    if cfg.qk_norm:
        q_all = np.concatenate([model_norm(q_all[:, h * D:(h + 1) * D], p["q_norm"], cfg) for h in range(H)], -1)
        k_all = np.concatenate([model_norm(k_all[:, h * D:(h + 1) * D], p["k_norm"], cfg) for h in range(Hkv)], -1)
    kept = (k_all, v_all)
    offset = 0
    if context is not None:
        offset = context[0].shape[0]
        k_all, v_all = np.concatenate([context[0], k_all]), np.concatenate([context[1], v_all])
    key_pos = np.arange(k_all.shape[0], dtype=np.float64)
    heads = []
    for h in range(H):
        g = h // (H // Hkv)
        q = rope(q_all[:, h * D:(h + 1) * D], key_pos[offset:], cfg.rope_theta, cfg.rope_dim)
        k = rope(k_all[:, g * D:(g + 1) * D], key_pos, cfg.rope_theta, cfg.rope_dim)
        v = v_all[:, g * D:(g + 1) * D]
        out = np.zeros((T, D))
        for t in range(T):
            pos = offset + t
            first = pos - cfg.window + 1 if context is not None else 0
            if limit is not None:  # a "swa" layer: only the last ``limit`` positions up to the query
                first = max(first, pos - limit + 1)
            seen = slice(max(first, 0), pos + 1)
            scores = k[seen] @ q[t] / np.sqrt(D)
            weights = np.exp(scores - scores.max())
            out[t] = (weights / weights.sum()) @ v[seen]
        if cfg.attn_output_gate:
            out = out * sigmoid(x @ p["wq_gate"][:, h * D:(h + 1) * D])
        heads.append(out)
    return np.concatenate(heads, axis=-1) @ p["wo"], kept


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


def gdn_update(S, q, k, v, g, beta, use_delta=True, scale=None):
    """One token of the gated delta rule, for any leading (batch, head) dims. S [..., Dk, Dv]; q, k [..., Dk] (q
    unscaled); v [..., Dv]; g (log decay), beta [...].

    delta:   S_t = exp(g) S + k (beta (v - exp(g) S^T k))^T
    hebbian: S_t = exp(g) S + beta k v^T  (use_delta=False)
    o_t = S_t^T (q * scale), scale = Dk**-0.5 unless given. Returns (o [..., Dv], S_t)."""
    a = np.exp(np.asarray(g))[..., None, None]
    err = v - np.einsum("...kv,...k->...v", a * S, k) if use_delta else v
    S = a * S + k[..., :, None] * (np.asarray(beta)[..., None] * err)[..., None, :]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return np.einsum("...kv,...k->...v", S, q * scale), S


def gated_delta_rule(q, k, v, g, beta, initial_state=None, use_delta=True, scale=None):
    """The gated delta rule token by token, in float64: THE recurrence every test compares against (the kernels'
    contract, and the GDN layer below). q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; g, beta [B, T, Hv];
    initial_state [B, Hv, Dk, Dv] or None (zeros). Value head h reads query/key head ``h // (Hv / Hk)``.
    Returns (o [B, T, Hv, Dv], final state [B, Hv, Dk, Dv])."""
    q, k, v, g, beta = (np.asarray(x, np.float64) for x in (q, k, v, g, beta))
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[2], v.shape[3]
    q, k = np.repeat(q, Hv // Hk, axis=2), np.repeat(k, Hv // Hk, axis=2)
    S = np.zeros((B, Hv, Dk, Dv)) if initial_state is None else np.array(initial_state, np.float64)
    o = np.zeros((B, T, Hv, Dv))
    for t in range(T):
        o[:, t], S = gdn_update(S, q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], use_delta, scale)
    return o, S


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
    q = l2_normalize(q_all.reshape(T, Hk, Dk))
    k = l2_normalize(k_all.reshape(T, Hk, Dk))
    o, S = gated_delta_rule(q[None], k[None], v_all.reshape(1, T, Hv, Dv), g[None], beta[None], S[None],
                            use_delta=cfg.ssm_rule == "delta")
    gated = rms_norm(o[0], p["o_norm"], cfg.norm_eps) * gate.reshape(T, Hv, Dv)
    return gated.reshape(T, Hv * Dv) @ p["wo"], S[0]


def jet(p, x, S, cfg):
    """JetBlock, token by token. x [T, d] (normalised block input of one window), S [H, Dk, Dv] -> (out, S)."""
    T = x.shape[0]
    H, Dk, Dv, K = cfg.jet_heads, cfg.jet_key_dim, cfg.jet_value_dim, cfg.jet_conv_size
    C = H * Dv
    u = x @ p["wv"]  # [T, C] raw values
    out = np.zeros((T, x.shape[1]))
    for t in range(T):
        kernel = (silu(x[t] @ p["conv_w1"]) @ p["conv_w2"] + p["conv_b2"]).reshape(C, K)
        y = np.zeros(C)
        for j in range(K):
            src = t - (K - 1 - j)  # tap K-1 is the current token
            if src >= 0:
                y += kernel[:, j] * u[src]
        v = silu(y).reshape(H, Dv)
        q = l2_normalize(silu(x[t] @ p["wq"]).reshape(H, Dk))
        k = l2_normalize(silu(x[t] @ p["wk"]).reshape(H, Dk))
        g = -np.exp(p["a_log"]) * softplus(x[t] @ p["w_a"] + p["dt_bias"])
        beta = sigmoid(x[t] @ p["w_b"])
        o, S = gdn_update(S, q, k, v, g, beta, cfg.ssm_rule == "delta")
        gated = rms_norm(o, p["o_norm"], cfg.jet_norm_eps) * silu(x[t] @ p["w_gate"]).reshape(H, Dv)
        out[t] = gated.reshape(C) @ p["wo"]
    return out, S


# ---------------------------------------------------------------------------------------------------------------
# Blocks, passes, windows


def run_layers(w: Weights, h, states, lo, hi, contexts=None):
    """Layers lo..hi-1 once over one window of one sequence: pre-norm residual blocks, h += mixer(norm(h)), then
    h += MLP(norm(h)) unless the layer is MLP-free. states: list of [Hv, Dk, Dv] per GDN layer; contexts: per
    attention layer the previous window's (k, v) (sliding eviction) or None. Returns (h, states, {attention
    layer index: (k, v) of this window})."""
    cfg = w.cfg
    states, kept, gdn_index = list(states), {}, sum(kind in ("gdn", "jet") for kind in w.runs[:lo])
    num_layers = len(cfg.layers)
    for i in range(lo, hi):
        layer = i % num_layers
        p, kind = w.layers[layer], w.runs[i]
        x = model_norm(h, p["norm1"], cfg)
        if kind in ("attn", "swa"):
            j = w.attn_index[i]
            limit = cfg.swa_window if kind == "swa" else None
            out, kept[j] = attention(p, x, cfg, contexts[j] if contexts else None, limit)
        elif kind == "jet":
            out, states[gdn_index] = jet(p, x, states[gdn_index], cfg)
            gdn_index += 1
        else:
            out, states[gdn_index] = gdn(p, x, states[gdn_index], cfg)
            gdn_index += 1
        sandwich = layer in cfg.sandwich_norm_layers
        h = h + (model_norm(out, p["mixer_out_norm"], cfg) if sandwich else out)
        if layer not in cfg.mlp_free_layers:
            out = swiglu_mlp(p["mlp"], model_norm(h, p["norm2"], cfg))
            h = h + (model_norm(out, p["mlp_out_norm"], cfg) if sandwich else out)
        if (i + 1) % num_layers == 0 and i + 1 < len(w.runs):
            h = model_norm(h, w.final_norm, cfg)
    return h, states, kept


def window_passes(w: Weights, h, states, passes: int, contexts=None):
    """A window: layers before sleep_layers once, the sleep layers ``passes`` times (pass n consumes pass n-1's
    hidden states and continues from the S it ended with), the layers after them once. Returns (h, states)."""
    depth = len(w.runs)
    lo, hi = w.cfg.sleep_layers or (0, depth)
    h, states, _ = run_layers(w, h, states, 0, lo, contexts)
    for n in range(passes):
        if n and w.cfg.loop_steps > 1 and (lo, hi) == (0, depth):  # sleep passes are more loops of a looped model
            h = model_norm(h, w.final_norm, w.cfg)
        h, states, _ = run_layers(w, h, states, lo, hi, contexts)
    h, states, _ = run_layers(w, h, states, hi, depth, contexts)
    return h, states


def wake_kv(w: Weights, h, states, contexts=None):
    """Sliding eviction: the attention keys/values of the window's wake pass (the whole stack once from the fast
    weights at the window's start), per attention layer: the next window's context."""
    _, _, kept = run_layers(w, h, states, 0, len(w.runs), contexts)
    return [kept[j] for j in range(len(kept))]


def blocks_pass(w: Weights, h, states):
    """One pass of the whole stack over one window of one sequence (hard eviction)."""
    h, states, _ = run_layers(w, h, states, 0, len(w.runs))
    return h, states


def logits_of(w: Weights, h):
    return model_norm(h, w.final_norm, w.cfg) @ w.unembed


def zero_states(w: Weights, batch_size: int):
    """[b][layer] -> float64 [Hv, Dk, Dv] zeros (per GDN or JetBlock layer, with its own head sizes)."""
    c = w.cfg
    shapes = [(c.jet_heads, c.jet_key_dim, c.jet_value_dim) if kind == "jet" else
              (c.gdn_value_heads, c.gdn_key_dim, c.gdn_value_dim) for kind in w.runs if kind in ("gdn", "jet")]
    return [[np.zeros(shape) for shape in shapes] for _ in range(batch_size)]


def states_from_jax(state):
    """sleepjax fast weights (tuple over layers of [B, Hv, Dk, Dv]) -> [b][layer] float64."""
    arrays = [np.asarray(s, np.float64) for s in state]
    return [[a[b] for a in arrays] for b in range(arrays[0].shape[0])]


def states_to_layers(states):
    """[b][layer] -> list over layers of [B, Hv, Dk, Dv] (comparable with sleepjax's tuple)."""
    return [np.stack([states[b][i] for b in range(len(states))]) for i in range(len(states[0]))]


def run_window(w: Weights, tokens, states, passes, contexts=None):
    """``passes`` (an int, or one int per sequence) passes over one window for every sequence. tokens [B, T] (T <= window); contexts: per sequence,
    per attention layer, the previous window's kept (k, v) (sliding eviction; None: hard eviction or no previous
    window). Returns (logits of the last pass [B, T, V], states, this window's kept (k, v) per sequence or None)."""
    logits, new_states, kept = [], [], []
    sliding = w.cfg.eviction == "sliding"
    for b in range(tokens.shape[0]):
        ctx = contexts[b] if contexts else None
        h0 = w.embed[tokens[b]]
        h, s = window_passes(w, h0, states[b], passes if isinstance(passes, int) else int(passes[b]), ctx)
        logits.append(logits_of(w, h))
        new_states.append(s)
        kept.append(wake_kv(w, h0, states[b], ctx) if sliding else None)
    return np.stack(logits), new_states, (kept if sliding else None)


def consolidate(w: Weights, states, ctx, n: int, contexts=None):
    """Sleep: n passes over ctx [B, T]; only the fast weights survive."""
    return run_window(w, np.asarray(ctx), states, n, contexts)[1]


def algorithm1(w: Weights, tokens, loss_mask, states=None):
    """Algorithm 1. tokens, loss_mask [B, T]; windows of ``window`` tokens, the last one shorter if T is not a
    multiple. Each example decides for itself: its window sleeps (N passes) iff none of ITS positions there is
    supervised; otherwise it wakes (one pass). Returns (logits [B, T, V], final states [b][layer])."""
    tokens, loss_mask = np.asarray(tokens), np.asarray(loss_mask, bool)
    B, T = tokens.shape
    L, N = w.cfg.window, w.cfg.sleep_n
    states = zero_states(w, B) if states is None else states
    logits, contexts = [], None
    for start in range(0, T, L):
        supervised = loss_mask[:, start:start + L].any(axis=1)  # [B]: per example
        passes = [1 if s else N for s in supervised]
        out, states, contexts = run_window(w, tokens[:, start:start + L], states, passes, contexts)
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
    logits, current, sleeps, contexts = [], start_states, 0, None
    for start in range(0, T, L):
        window = tokens[:, start:start + L]
        out, current, kept = run_window(w, window, start_states, 1, contexts)  # causal: prefix outputs = stream's
        logits.append(out)
        if window.shape[1] == L:
            start_states = current = consolidate(w, start_states, window, N, contexts)
            contexts = kept
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
