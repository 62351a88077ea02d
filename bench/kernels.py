"""Time the sequence-mixer kernels: GDN Pallas vs chunked XLA (vs fla), attention Pallas vs cuDNN (vs XLA).

GPU defaults (the issue's reference shapes): GDN at B=1, T=8192, D=128 bfloat16 with H=16 and H=96 (fla's
published shape); window attention at H=16 with a 2048-token sliding window. For every (kernel, impl, heads,
mode) row: the median wall time (compile excluded), the compile seconds, the achieved bandwidth over the
essential bytes (every input read once, every output written once; forward+backward also reads o, dO and writes
the gradients) and its fraction of the HBM roofline (--peak-bw). The JSON file (--json) is rewritten after every
row, so a run killed by a timeout keeps what it measured. Rows "gdn_scan" give the compile seconds of the two
Pallas state-scan kernels on their own.

fla (flash-linear-attention, torch) is timed when importable: forward, and forward+backward with its Hopper guard
switched off (``fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True``: fla refuses its gated backward on Hopper
with Triton < 3.7.1, fla issue #640; its gradients are then not to be trusted, the timing is).

On CPU the Pallas kernels run in interpret mode (semantics only: the timings mean nothing); use small sizes:
    python bench/kernels.py --seq 128 --heads 2 --head-dim 32 --window 32 --iters 1 --warmup 0
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from sleepjax.kernels import attention, gdn, gdn_pallas, gdn_scan

GDN_IMPLS = ("pallas", "chunked", "fla")
ATTENTION_IMPLS = ("pallas", "cudnn", "xla")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default="gdn,attention", help="comma list: gdn, attention")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--heads", default="16", help="comma list of value heads (GDN) / query heads (attention)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--window", type=int, default=2048, help="attention sliding window (0: full causal)")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--block-v", type=int, default=None, help="GDN scan value tile (default: platform default)")
    p.add_argument("--num-stages", type=int, default=None, help="GDN scan Triton num_stages")
    p.add_argument("--no-delta", action="store_true", help="GDN: the gated Hebbian rule instead of the delta rule")
    p.add_argument("--impls", default="pallas,chunked,fla,cudnn,xla", help="implementations to time")
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--peak-bw", type=float, default=3.35e12, help="peak HBM bandwidth in bytes/s (H100 SXM)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--interpret", choices=["auto", "yes", "no"], default="auto",
                   help="Pallas interpret mode (auto: only on CPU)")
    p.add_argument("--json", default=None, help="write the results to this JSON file (after every row)")
    return p.parse_args(argv)


class Report:
    def __init__(self, a):
        self.a, self.rows = a, []
        devices = jax.devices()
        self.meta = dict(args=vars(a), backend=jax.default_backend(), device=devices[0].device_kind,
                         jax=jax.__version__, date=time.strftime("%Y-%m-%d %H:%M:%S"))

    def add(self, **row):
        self.rows.append(row)
        ms = f"{row['ms']:10.3f} ms" if "ms" in row else " " * 13
        extra = f"  {100 * row['roofline']:6.2f}% of HBM roofline" if "roofline" in row else ""
        extra += f"  {row['TFLOPs']:7.2f} TFLOP/s" if "TFLOPs" in row else ""
        extra += f"  ({row['note']})" if "note" in row else ""
        print(f"{row['kernel']:9s} {row['impl']:8s} H={row.get('heads', '-'):<3} {row['mode']:8s} {ms}  "
              f"compile {row.get('compile_s', float('nan')):6.2f} s{extra}", flush=True)
        self.save()

    def save(self):
        if self.a.json:
            with open(self.a.json, "w") as fh:
                json.dump(dict(self.meta, results=self.rows), fh, indent=1)


def time_jax(fn, args, iters: int, warmup: int):
    """(median seconds per call, compile seconds) of a jitted fn."""
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(max(1, iters)):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), compile_s


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


def gdn_inputs(B, T, H, D, dt):
    ks = jax.random.split(jax.random.PRNGKey(0), 6)
    q = jax.random.normal(ks[0], (B, T, H, D), dt)
    k = jax.random.normal(ks[1], (B, T, H, D), jnp.float32)
    k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(dt)
    v = jax.random.normal(ks[2], (B, T, H, D), dt)
    g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, H)))
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
    return q, k, v, g, beta, jnp.zeros((B, H, D, D), jnp.float32)


def run_gdn(a, rep, H, interpret, impls, modes):
    B, T, D, dt = a.batch, a.seq, a.head_dim, jnp.dtype(a.dtype)
    args = gdn_inputs(B, T, H, D, dt)
    use_delta = not a.no_delta
    in_bytes = nbytes(*([((B, T, H, D), dt)] * 3 + [((B, T, H), jnp.float32)] * 2 + [((B, H, D, D), jnp.float32)]))
    out_bytes = nbytes(((B, T, H, D), dt), ((B, H, D, D), jnp.float32))
    io = {"fwd": in_bytes + out_bytes, "fwd+bwd": 2 * (in_bytes + out_bytes) + in_bytes}
    blocks = gdn_pallas.GDNBlockSizes(block_v=a.block_v, num_stages=a.num_stages or 1)
    fns = {
        "pallas": lambda *x: gdn_pallas.gated_delta_rule_pallas(*x, use_delta=use_delta, chunk_size=a.chunk_size,
                                                                block_sizes=blocks, interpret=interpret),
        "chunked": lambda *x: gdn.gated_delta_rule(*x, use_delta=use_delta, chunk_size=a.chunk_size,
                                                   backend="chunked"),
    }
    for impl in (i for i in GDN_IMPLS if i in impls):
        if impl == "fla":
            run_fla(a, rep, H, args, io, modes)
            continue
        for mode in modes:
            fn = jax.jit(fns[impl]) if mode == "fwd" else fwd_bwd(fns[impl], 6)
            t, c = time_jax(fn, args, a.iters, a.warmup)
            rep.add(kernel="gdn", impl=impl, heads=H, mode=mode, ms=t * 1e3, compile_s=c,
                    GBps=io[mode] / t / 1e9, roofline=io[mode] / t / a.peak_bw)
    if "pallas" in impls:
        scan_kernel_compile(a, rep, H, interpret, blocks, use_delta)


def scan_kernel_compile(a, rep, H, interpret, blocks, use_delta):
    """Compile seconds of the two Pallas state-scan kernels alone, at this shape."""
    B, T, D, dt = a.batch, a.seq, a.head_dim, jnp.dtype(a.dtype)
    C = min(gdn_pallas.kernel_chunk_size(a.chunk_size), max(16, 1 << (T - 1).bit_length()))
    n = -(-T // C)
    cfg = gdn_pallas.scan_config(use_delta=use_delta, value_head_dim=D, block_sizes=blocks, interpret=interpret)
    chunk = jax.ShapeDtypeStruct((B, H, n, C, D), dt)
    args = (chunk if use_delta else None, chunk, chunk, jax.ShapeDtypeStruct((B, H, n, C), jnp.float32),
            jax.ShapeDtypeStruct((B, H, D, D), jnp.float32))
    fwd = jax.jit(lambda *x: gdn_scan.state_scan(cfg, *x))
    both = jax.jit(lambda *x: jax.vjp(lambda *y: gdn_scan.state_scan(cfg, *y), *x)[1](
        gdn_scan.state_scan(cfg, *x)))
    for mode, fn in (("fwd", fwd), ("fwd+bwd", both)):
        t0 = time.perf_counter()
        fn.lower(*args).compile()
        rep.add(kernel="gdn_scan", impl="pallas", heads=H, mode=mode, compile_s=time.perf_counter() - t0,
                note="forward kernel" if mode == "fwd" else "forward + reverse kernels (+ XLA glue)")


def run_fla(a, rep, H, args, io, modes):
    try:
        import torch
        import fla.ops.common.chunk_o as fla_chunk_o
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception as e:  # fla / torch not installed: record why, time the rest
        rep.add(kernel="gdn", impl="fla", heads=H, mode="-", note=f"not importable: {type(e).__name__}: {e}"[:200])
        return
    if not torch.cuda.is_available():
        rep.add(kernel="gdn", impl="fla", heads=H, mode="-", note="torch sees no CUDA device")
        return
    dev, tdt = "cuda", {"bfloat16": torch.bfloat16, "float32": torch.float32}[a.dtype]
    q, k, v, g, beta, s0 = (torch.tensor(np.asarray(x, np.float32)).to(dev) for x in args)
    q, k, v = (x.to(tdt) for x in (q, k, v))
    for mode in modes:
        if mode == "fwd+bwd":
            fla_chunk_o.TRITON_ABOVE_3_7_1 = True  # timing only: fla refuses its gated backward on Hopper (#640)
        leaves = [x.detach().requires_grad_(mode == "fwd+bwd") for x in (q, k, v, g, beta)]

        def call():
            o, sT = chunk_gated_delta_rule(*leaves[:3], g=leaves[3], beta=leaves[4], initial_state=s0,
                                           output_final_state=True)
            if mode == "fwd+bwd":
                (o.float().sin().sum() + sT.float().sin().sum()).backward()
            return o

        t0 = time.perf_counter()
        call()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0  # fla autotunes on its first call
        for _ in range(a.warmup):
            call()
        torch.cuda.synchronize()
        times = []
        for _ in range(max(1, a.iters)):
            t0 = time.perf_counter()
            call()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        rep.add(kernel="gdn", impl="fla", heads=H, mode=mode, ms=t * 1e3, compile_s=first,
                GBps=io[mode] / t / 1e9, roofline=io[mode] / t / a.peak_bw,
                **({"note": "backward guard overridden: timing only"} if mode == "fwd+bwd" else {}))


def run_attention(a, rep, H, interpret, impls, modes):
    B, T, D, dt = a.batch, a.seq, a.head_dim, jnp.dtype(a.dtype)
    w = a.window if a.window and a.window < T else None
    ks = jax.random.split(jax.random.PRNGKey(1), 3)
    args = tuple(jax.random.normal(kk, (B, T, H, D), dt) for kk in ks)
    pairs = T * (T + 1) // 2 if w is None else T * w - w * (w - 1) // 2
    flops = {"fwd": 4 * B * H * D * pairs, "fwd+bwd": 3.5 * 4 * B * H * D * pairs}  # bwd ~ 2.5x fwd
    io_fwd = nbytes(*([((B, T, H, D), dt)] * 4))
    io = {"fwd": io_fwd, "fwd+bwd": io_fwd + nbytes(*([((B, T, H, D), dt)] * 8))}
    fns = {
        "pallas": lambda *x: attention.window_attention_pallas(*x, sliding_window=w, interpret=interpret),
        "cudnn": lambda *x: attention.cudnn_window_attention(*x, sliding_window=w),
        "xla": lambda *x: attention.xla_window_attention(*x, sliding_window=w),
    }
    for impl in (i for i in ATTENTION_IMPLS if i in impls):
        if impl == "cudnn" and jax.default_backend() != "gpu":
            continue
        for mode in modes:
            fn = jax.jit(fns[impl]) if mode == "fwd" else fwd_bwd(fns[impl], 3)
            try:
                t, c = time_jax(fn, args, a.iters, a.warmup)
            except Exception as e:  # an unavailable baseline (cuDNN refusing a shape) must not stop the run
                if impl == "pallas":
                    raise
                rep.add(kernel="attention", impl=impl, heads=H, mode=mode,
                        note=f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                continue
            rep.add(kernel="attention", impl=impl, heads=H, mode=mode, ms=t * 1e3, compile_s=c,
                    GBps=io[mode] / t / 1e9, roofline=io[mode] / t / a.peak_bw, TFLOPs=flops[mode] / t / 1e12)


def main(argv=None):
    a = parse_args(argv)
    interpret = {"auto": jax.default_backend() == "cpu", "yes": True, "no": False}[a.interpret]
    impls = {s for s in a.impls.split(",") if s}
    modes = [m for m in a.modes.split(",") if m]
    kernels = [s for s in a.kernels.split(",") if s]
    for name in kernels:
        if name not in ("gdn", "attention"):
            raise ValueError(f"--kernels must list gdn and/or attention, got {name!r}")
    for m in modes:
        if m not in ("fwd", "fwd+bwd"):
            raise ValueError(f"--modes must list fwd and/or fwd+bwd, got {m!r}")
    rep = Report(a)
    print(f"jax {jax.__version__} on {jax.default_backend()}: {rep.meta['device']}; peak bandwidth "
          f"{a.peak_bw:.3g} B/s; pallas interpret={interpret}; B={a.batch} T={a.seq} D={a.head_dim} {a.dtype}",
          flush=True)
    if interpret:
        print("(interpret mode: timings measure the Pallas interpreter, not a kernel)")
    rep.save()
    for H in (int(h) for h in a.heads.split(",")):
        if "gdn" in kernels:
            run_gdn(a, rep, H, interpret, impls, modes)
        if "attention" in kernels:
            run_attention(a, rep, H, interpret, impls, modes)
    return rep.rows


if __name__ == "__main__":
    main(sys.argv[1:])
