"""Gated delta rule references in XLA: the token recurrence (the oracle) and the one-token decode step.

Per value head h with fast weight S of shape [Dk, Dv] (float32):
    S <- exp(g_t) S
    S <- S + k_t (beta_t (v_t - S^T k_t))^T          (use_delta=True; use_delta=False drops "- S^T k_t")
    o_t = S^T (scale q_t)
Query/key head i serves value heads i*Hv/Hk ... (i+1)*Hv/Hk - 1. Conventions match flash-linear-attention's
``chunk_gated_delta_rule`` so results can be compared.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import _checks


def expand_heads(x, num_heads: int):
    """[..., Hk, D] -> [..., Hv, D]: key head i serves value heads i*r ... (i+1)*r - 1."""
    return jnp.repeat(x, num_heads // x.shape[-2], axis=-2)


def compute_dtype(x_dtype):
    """float32, or float64 when given float64 (the tests' oracle)."""
    return jnp.result_type(jnp.float32, x_dtype)


def prepare(q, k, v, g, beta, initial_state, scale):
    """Inputs in the compute dtype, heads expanded to Hv, q scaled, state materialised."""
    B, T, Hk, Hv, Dk, Dv = _checks.check_gdn_inputs(q, k, v, g, beta, initial_state)
    scale = Dk**-0.5 if scale is None else scale
    ct = compute_dtype(q.dtype)
    q = expand_heads(q.astype(ct), Hv) * scale
    k = expand_heads(k.astype(ct), Hv)
    state = jnp.zeros((B, Hv, Dk, Dv), ct) if initial_state is None else initial_state.astype(ct)
    return q, k, v.astype(ct), g.astype(ct), beta.astype(ct), state


def token_update(state, q, k, v, g, beta, use_delta: bool):
    """One token for every (batch, head). state [B,H,Dk,Dv]; q,k [B,H,Dk] (q scaled); v [B,H,Dv]; g,beta [B,H]."""
    state = jnp.exp(g)[..., None, None] * state
    if use_delta:
        v = v - jnp.einsum("bhkv,bhk->bhv", state, k)
    state = state + k[..., :, None] * (beta[..., None] * v)[..., None, :]
    return jnp.einsum("bhkv,bhk->bhv", state, q), state


@functools.partial(jax.jit, static_argnames=("scale", "use_delta"))
def gated_delta_rule_step(q, k, v, g, beta, state, *, scale=None, use_delta=True):
    """One decoding step. q, k [B, Hk, Dk]; v [B, Hv, Dv]; g, beta [B, Hv]; state [B, Hv, Dk, Dv] (float32).
    Returns o [B, Hv, Dv] in q's dtype and the new float32 state. One token reads and writes S once: no kernel
    would help."""
    q4, k4, v4, g3, b3 = (x[:, None] for x in (q, k, v, g, beta))
    qf, kf, vf, gf, bf, state = prepare(q4, k4, v4, g3, b3, state, scale)
    o, state = token_update(state, qf[:, 0], kf[:, 0], vf[:, 0], gf[:, 0], bf[:, 0], use_delta)
    return o.astype(q.dtype), state


@functools.partial(jax.jit, static_argnames=("scale", "use_delta"))
def recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=None, *, scale=None, use_delta=True):
    """Token-by-token ``lax.scan``: slow, simple, the oracle for every other backend."""
    qf, kf, vf, gf, bf, state = prepare(q, k, v, g, beta, initial_state, scale)

    def body(s, xs):
        o, s = token_update(s, *xs, use_delta)
        return s, o

    time_major = [jnp.moveaxis(x, 1, 0) for x in (qf, kf, vf, gf, bf)]
    state, o = jax.lax.scan(body, state, time_major)
    return jnp.moveaxis(o, 0, 1).astype(q.dtype), state
