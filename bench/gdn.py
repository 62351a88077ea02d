"""Tokens/s of the chunked vs recurrent gated delta rule, forward and forward+backward.

    python bench/gdn.py                      # the issue's setting: B=1, T=4096, Hk=Hv=4, Dk=Dv=64, float32
    python bench/gdn.py --T=8192 --backends=chunked,pallas
"""

import argparse
import time

import jax
import jax.numpy as jnp

from sleepjax.kernels import gated_delta_rule


def inputs(B, T, H, D, dtype):
    ks = jax.random.split(jax.random.PRNGKey(0), 5)
    q = jax.random.normal(ks[0], (B, T, H, D), dtype)
    k = jax.random.normal(ks[1], (B, T, H, D))
    k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, H, D), dtype)
    g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, H)))
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
    return q, k, v, g, beta


def timed(fn, args, repeats):
    jax.block_until_ready(fn(*args))  # compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--backends", default="chunked,recurrent,xla")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    xs = inputs(args.B, args.T, args.H, args.D, jnp.dtype(args.dtype))
    tokens = args.B * args.T
    print(f"B={args.B} T={args.T} H={args.H} D={args.D} {args.dtype} on {jax.devices()[0].device_kind}")
    results = {}
    for backend in args.backends.split(","):
        fwd = jax.jit(lambda *a, b=backend: gated_delta_rule(*a, backend=b))
        loss = lambda *a, b=backend: sum(jnp.sum(x.astype(jnp.float32)) for x in gated_delta_rule(*a, backend=b))
        fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))
        t_f, t_fb = timed(fwd, xs, args.repeats), timed(fwd_bwd, xs, args.repeats)
        results[backend] = (t_f, t_fb)
        print(f"{backend:10s} forward {t_f * 1e3:8.1f} ms ({tokens / t_f / 1e3:8.1f}k tok/s)   "
              f"forward+backward {t_fb * 1e3:8.1f} ms ({tokens / t_fb / 1e3:8.1f}k tok/s)")
    if "chunked" in results and "recurrent" in results:
        (cf, cfb), (rf, rfb) = results["chunked"], results["recurrent"]
        print(f"chunked speed-up over recurrent: forward {rf / cf:.1f}x, forward+backward {rfb / cfb:.1f}x")


if __name__ == "__main__":
    main()
