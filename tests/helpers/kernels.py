"""Random inputs for the mixer kernels (GDN with its hard cases, attention) and float64 attention references.

The float64 gated-delta-rule reference is ``numpy_reference.gated_delta_rule``."""

import jax
import jax.numpy as jnp
import numpy as np
from jax import enable_x64
from jax.experimental.pallas import tpu as pltpu


def make_inputs(key, B=2, T=37, Hk=2, Hv=4, Dk=16, Dv=8, decay="normal", beta_range="normal", state=True,
                dtype=jnp.float32, beta_margin=1e-4):
    """(q, k, v, g, beta, initial_state) for the gated delta rule; keys unit-norm (the model L2-normalises them).
    Hard cases: decay "strong" (g near -10: the state is almost wiped every token) or "none" (g = 0);
    beta_range "low" (beta ~ beta_margin) or "high" (beta ~ 1 - beta_margin); state=False: no initial state."""
    ks = jax.random.split(key, 6)
    q = jax.random.normal(ks[0], (B, T, Hk, Dk))
    k = jax.random.normal(ks[1], (B, T, Hk, Dk))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (B, T, Hv, Dv))
    if decay == "strong":
        g = -10.0 + 0.5 * jax.random.uniform(ks[3], (B, T, Hv))
    elif decay == "none":
        g = jnp.zeros((B, T, Hv))
    else:
        g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, Hv)) - 1.0)
    u = jax.random.uniform(ks[4], (B, T, Hv))
    beta = {"normal": u, "low": beta_margin * u, "high": 1.0 - beta_margin * u}[beta_range]
    s0 = jax.random.normal(ks[5], (B, Hv, Dk, Dv)) if state else None
    cast = lambda x: x.astype(dtype)
    return cast(q), cast(k), cast(v), g, beta, s0


def make_qkv(key, B, T, H, Hkv, D, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(key, 3)
    return (jax.random.normal(kq, (B, T, H, D)).astype(dtype), jax.random.normal(kk, (B, T, Hkv, D)).astype(dtype),
            jax.random.normal(kv, (B, T, Hkv, D)).astype(dtype))


def allowed(T, window):
    """[T, T] causal mask, within ``window`` tokens (None: the whole prefix)."""
    i, j = np.indices((T, T))
    m = j <= i
    if window is not None:
        m &= i - j < window
    return m


def numpy_attention(q, k, v, window):
    """Causal (sliding-window) attention with grouped heads, float64 NumPy softmax."""
    q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
    B, T, H, D = q.shape
    r = H // k.shape[2]
    k, v = np.repeat(k, r, axis=2), np.repeat(v, r, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D)
    s = np.where(allowed(T, window), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def attention_float64_grads(q, k, v, window, cot):
    """Gradients (q, k, v) of sum(attention * cot): float64 autodiff of one masked softmax over the whole window."""
    with enable_x64():
        q, k, v, cot = (jnp.asarray(np.asarray(jnp.asarray(x, jnp.float32)), jnp.float64) for x in (q, k, v, cot))
        T, D = q.shape[1], q.shape[3]
        mask = jnp.asarray(allowed(T, window))

        def f(q, k, v):
            r = q.shape[2] // k.shape[2]
            kk, vv = jnp.repeat(k, r, axis=2), jnp.repeat(v, r, axis=2)
            s = jnp.where(mask, jnp.einsum("bqhd,bkhd->bhqk", q, kk) / np.sqrt(D), -jnp.inf)
            o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), vv)
            return jnp.sum(o * cot)

        return [np.asarray(x) for x in jax.grad(f, (0, 1, 2))(q, k, v)]


def interpreter(platform):
    """Pallas interpret mode. TPU wrapper: the TPU-faithful interpreter, with uninitialised buffers poisoned by NaN
    (catches a read of scratch or output blocks before they are written). GPU wrapper: the generic interpreter."""
    return pltpu.InterpretParams(uninitialized_memory="nan") if platform == "tpu" else True
