"""Benchmark the sequence-mixer kernels: Pallas vs the XLA paths (and cuDNN attention on GPU).

GPU defaults (the issue's reference shapes): GDN at B=1, T=8192, H=16, D=128 bfloat16; window attention at the
same shape with a 2048-token sliding window. Reports the median wall time of the forward and of forward+backward,
the achieved bandwidth, and the fraction of the HBM roofline:

    roofline fraction = essential bytes / time / peak bandwidth   (--peak-bw, default 3.35e12 B/s: H100 SXM)

"Essential bytes" = every input read once and every output written once (forward; for forward+backward also
the backward's inputs, o and dO, and its outputs, dq/dk/dv/...). Kernel-internal traffic (e.g. the GDN
backward's recomputed chunk states) is NOT counted, so the fraction is an upper-bound style efficiency measure.
Attention also reports TFLOP/s over the unmasked (query, key) pairs.

On CPU the Pallas kernels run in interpret mode (semantics only: the timings mean nothing); use small sizes:
    python bench/kernels.py --batch 1 --seq 128 --heads 2 --head-dim 32 --window 32 --iters 1 --warmup 0
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from sleepjax.kernels import attention, attention_pallas, gdn, gdn_pallas


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default="gdn,attention", help="comma list: gdn, attention")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--heads", type=int, default=16, help="value heads (GDN) / query heads (attention)")
    p.add_argument("--kv-heads", type=int, default=None, help="key heads (GDN) / KV heads (attention); "
                   "default: --heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--window", type=int, default=2048, help="attention sliding window (0: full causal)")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--block-v", type=int, default=None, help="GDN value tile (default: platform default)")
    p.add_argument("--gdn-precision", default="highest", choices=["highest", "default"],
                   help="GDN head-dim matmul precision (default = TF32 on GPU)")
    p.add_argument("--attn-precision", default="highest", choices=["highest", "default"],
                   help="attention matmul precision for float32 inputs")
    p.add_argument("--no-delta", action="store_true", help="GDN: the gated Hebbian rule instead of the delta rule")
    p.add_argument("--peak-bw", type=float, default=3.35e12, help="peak HBM bandwidth in bytes/s")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--interpret", choices=["auto", "yes", "no"], default="auto",
                   help="Pallas interpret mode (auto: only on CPU)")
    p.add_argument("--skip", default="", help="comma list of implementations to skip (e.g. chunked,cudnn)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def bench(fn, args, iters: int, warmup: int) -> float:
    """Median seconds per call of a jitted fn (compile excluded)."""
    jax.block_until_ready(fn(*args))
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(max(1, iters)):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def nbytes(*shapes_dtypes) -> int:
    total = 0
    for shape, dtype in shapes_dtypes:
        n = 1
        for s in shape:
            n *= s
        total += n * jnp.dtype(dtype).itemsize
    return total


def fwd_bwd(f, n_args: int):
    """jit(grad) of a random-projection loss over every output of f, w.r.t. all n_args inputs."""
    def loss(*a):
        out = f(*a)
        outs = out if isinstance(out, tuple) else (out,)
        return sum(jnp.sum(jnp.sin(x.astype(jnp.float32))) for x in outs)
    return jax.jit(jax.grad(loss, tuple(range(n_args))))


def report(rows, name, impl, mode, seconds, bytes_moved, peak_bw, flops=None):
    row = dict(kernel=name, impl=impl, mode=mode, ms=seconds * 1e3, GBps=bytes_moved / seconds / 1e9,
               roofline=bytes_moved / seconds / peak_bw)
    if flops is not None:
        row["TFLOPs"] = flops / seconds / 1e12
    rows.append(row)
    extra = f"  {row['TFLOPs']:7.2f} TFLOP/s" if flops is not None else ""
    print(f"{name:10s} {impl:9s} {mode:8s} {row['ms']:10.3f} ms  {row['GBps']:8.1f} GB/s  "
          f"{100 * row['roofline']:6.2f}% of HBM roofline{extra}", flush=True)


def run_gdn(a, rows, interpret, skip):
    B, T, Hv, D = a.batch, a.seq, a.heads, a.head_dim
    Hk = a.kv_heads or Hv
    dt = jnp.dtype(a.dtype)
    ks = jax.random.split(jax.random.PRNGKey(0), 6)
    q = jax.random.normal(ks[0], (B, T, Hk, D), dt)
    k = jax.random.normal(ks[1], (B, T, Hk, D), jnp.float32)
    k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(dt)
    v = jax.random.normal(ks[2], (B, T, Hv, D), dt)
    g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, Hv)))
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, Hv)))
    s0 = jnp.zeros((B, Hv, D, D), jnp.float32)
    args = (q, k, v, g, beta, s0)
    use_delta = not a.no_delta

    in_bytes = nbytes(((B, T, Hk, D), dt), ((B, T, Hk, D), dt), ((B, T, Hv, D), dt), ((B, T, Hv), jnp.float32),
                      ((B, T, Hv), jnp.float32), ((B, Hv, D, D), jnp.float32))
    out_bytes = nbytes(((B, T, Hv, D), dt), ((B, Hv, D, D), jnp.float32))  # o, final state
    io_fwd = in_bytes + out_bytes
    # backward: reads the inputs again and the outputs' cotangents, writes one gradient per input
    io_bwd = io_fwd + (in_bytes + out_bytes) + in_bytes
    print(f"\nGDN  B={B} T={T} Hk={Hk} Hv={Hv} D={D} {dt.name} use_delta={use_delta} chunk={a.chunk_size}")
    blocks = gdn_pallas.GDNBlockSizes(block_v=a.block_v, precision=a.gdn_precision)
    impls = {
        "pallas": lambda *x: gdn_pallas.gated_delta_rule_pallas(*x, use_delta=use_delta, chunk_size=a.chunk_size,
                                                                block_sizes=blocks, interpret=interpret),
        "chunked": lambda *x: gdn.gated_delta_rule(*x, use_delta=use_delta, chunk_size=a.chunk_size,
                                                   backend="chunked"),
    }
    for impl, f in impls.items():
        if impl in skip:
            continue
        report(rows, "gdn", impl, "fwd", bench(jax.jit(f), args, a.iters, a.warmup), io_fwd, a.peak_bw)
        report(rows, "gdn", impl, "fwd+bwd", bench(fwd_bwd(f, 6), args, a.iters, a.warmup), io_bwd, a.peak_bw)


def run_attention(a, rows, interpret, skip):
    B, T, H, D = a.batch, a.seq, a.heads, a.head_dim
    Hkv = a.kv_heads or H
    w = a.window if a.window and a.window < T else None
    dt = jnp.dtype(a.dtype)
    ks = jax.random.split(jax.random.PRNGKey(1), 3)
    q = jax.random.normal(ks[0], (B, T, H, D), dt)
    k = jax.random.normal(ks[1], (B, T, Hkv, D), dt)
    v = jax.random.normal(ks[2], (B, T, Hkv, D), dt)
    args = (q, k, v)
    pairs = T * (T + 1) // 2 if w is None else T * w - w * (w - 1) // 2
    flops_fwd = 4 * B * H * D * pairs
    flops_bwd = flops_fwd + 2.5 * flops_fwd  # backward ~ 2.5x forward (5 matmuls vs 2)
    io_fwd = nbytes(((B, T, H, D), dt), ((B, T, Hkv, D), dt), ((B, T, Hkv, D), dt), ((B, T, H, D), dt))
    # backward: reads q, o, dO, k, v and writes dq, dk, dv
    io_bwd = io_fwd + nbytes(*([((B, T, H, D), dt)] * 4 + [((B, T, Hkv, D), dt)] * 4))
    print(f"\nattention  B={B} T={T} H={H} Hkv={Hkv} D={D} {dt.name} window={w}")
    blocks = attention_pallas.AttentionBlockSizes(precision=a.attn_precision)
    impls = {
        "pallas": lambda *x: attention_pallas.window_attention_pallas(*x, sliding_window=w, block_sizes=blocks,
                                                                      interpret=interpret),
        "xla": lambda *x: attention.xla_window_attention(*x, sliding_window=w),
    }
    if jax.default_backend() == "gpu":
        impls["cudnn"] = lambda *x: jax.nn.dot_product_attention(
            *x, is_causal=True, local_window_size=None if w is None else (w - 1, 0), implementation="cudnn")
    for impl, f in impls.items():
        if impl in skip:
            continue
        try:
            t_fwd = bench(jax.jit(f), args, a.iters, a.warmup)
            t_bwd = bench(fwd_bwd(f, 3), args, a.iters, a.warmup)
        except Exception as e:  # an unavailable baseline (e.g. no cuDNN for this shape) must not stop the run
            if impl == "pallas":
                raise
            print(f"attention  {impl:9s} unavailable: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            continue
        report(rows, "attention", impl, "fwd", t_fwd, io_fwd, a.peak_bw, flops_fwd)
        report(rows, "attention", impl, "fwd+bwd", t_bwd, io_bwd, a.peak_bw, flops_bwd)


def main(argv=None):
    a = parse_args(argv)
    interpret = {"auto": jax.default_backend() == "cpu", "yes": True, "no": False}[a.interpret]
    skip = {s for s in a.skip.split(",") if s}
    devices = jax.devices()
    print(f"jax {jax.__version__} on {jax.default_backend()}: {devices[0].device_kind} x{len(devices)}; "
          f"peak bandwidth {a.peak_bw:.3g} B/s; pallas interpret={interpret}")
    if interpret:
        print("(interpret mode: timings measure the Pallas interpreter, not a kernel)")
    rows = []
    kernels = [s for s in a.kernels.split(",") if s]
    for name in kernels:
        if name not in ("gdn", "attention"):
            raise ValueError(f"--kernels must list gdn and/or attention, got {name!r}")
    if "gdn" in kernels:
        run_gdn(a, rows, interpret, skip)
    if "attention" in kernels:
        run_attention(a, rows, interpret, skip)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(args=vars(a), backend=jax.default_backend(), device=devices[0].device_kind,
                           jax=jax.__version__, results=rows), fh, indent=1)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
