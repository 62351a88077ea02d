"""Wake latency: per-token stream_step time (median) near stream positions 1k and 32k, the cost of one sleep,
and the same for an attention-only model that keeps its whole KV cache.

    python bench/wake.py                   # tiny config, window 64, N = 4
    python bench/wake.py --positions=1024,32768 --window=64 --sleep_n=4
    python bench/wake.py --eviction=sliding --skip_full_cache   # sliding-window eviction (2L keys per token)
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import sleepjax
from experiments.configs.common import SIZES


def time_steps(step, params, stream, tokens):
    """Per-token wall time of ``step`` over ``tokens`` [T, B]; returns (times, final stream, slept flags)."""
    times, slept = [], []
    for token in tokens:
        sleeps = int(stream.sleeps)
        t0 = time.perf_counter()
        logits, stream = step(params, stream, token)
        jax.block_until_ready(logits)
        jax.block_until_ready(stream.fast_weights)
        times.append(time.perf_counter() - t0)
        slept.append(int(stream.sleeps) > sleeps)
    return np.array(times), stream, np.array(slept)


def sleepjax_latency(args, positions):
    cfg = sleepjax.ModelConfig(**SIZES[args.config], vocab_size=256, window=args.window, sleep_n=args.sleep_n,
                               eviction=args.eviction)
    params = sleepjax.init(cfg, jax.random.PRNGKey(0))
    step = jax.jit(sleepjax.stream_step)
    stream = sleepjax.stream_init(params, args.batch)
    total = max(positions) + args.sample
    tokens = jax.random.randint(jax.random.PRNGKey(1), (total, args.batch), 0, 256, dtype=jnp.int32)
    step(params, stream, tokens[0])  # compile
    times, stream, slept = time_steps(step, params, stream, tokens)
    wake = {p: statistics.median(times[p:p + args.sample][~slept[p:p + args.sample]]) for p in positions}
    sleep_cost = statistics.median(times[slept]) - statistics.median(times[~slept])
    return wake, sleep_cost, int(stream.sleeps)


def full_cache_latency(args, position):
    """An attention-only model whose KV cache holds all ``position`` previous tokens (window = position + 1)."""
    layers = len(sleepjax.ModelConfig(**SIZES[args.config]).layers)
    cfg = sleepjax.ModelConfig(**{**SIZES[args.config], "layers": ("attn",) * layers}, vocab_size=256,
                               window=position + args.sample + 1, sleep_n=1)
    params = sleepjax.init(cfg, jax.random.PRNGKey(0))
    stream = sleepjax.stream_init(params, args.batch)
    kv = tuple((jax.random.normal(jax.random.PRNGKey(i), k.shape, k.dtype), v) for i, (k, v) in
               enumerate(stream.kv_cache))  # the values do not matter, only how many slots are read
    stream = stream.replace(kv_cache=kv, position=jnp.asarray(position, jnp.int32))
    step = jax.jit(sleepjax.stream_step)
    tokens = jnp.zeros((args.sample, args.batch), jnp.int32)
    step(params, stream, tokens[0])
    times, _, _ = time_steps(step, params, stream, tokens)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="tiny", help="a model size of experiments/configs/common.py")
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--sleep_n", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--positions", default="1024,32768")
    ap.add_argument("--sample", type=int, default=200, help="tokens timed after each position")
    ap.add_argument("--eviction", default="hard", choices=["hard", "sliding"])
    ap.add_argument("--skip_full_cache", action="store_true", help="skip the attention-only full-cache baseline")
    args = ap.parse_args()
    positions = [int(p) for p in args.positions.split(",")]
    print(f"{args.config} config, window {args.window}, N = {args.sleep_n}, {args.eviction} eviction, batch "
          f"{args.batch}, device {jax.devices()[0].device_kind}")
    wake, sleep_cost, sleeps = sleepjax_latency(args, positions)
    for p in positions:
        print(f"sleepjax   position ~{p:6d}: median wake step {wake[p] * 1e3:7.3f} ms")
    print(f"sleepjax   ratio {positions[-1]}/{positions[0]}: {wake[positions[-1]] / wake[positions[0]]:.3f}   "
          f"one sleep (N = {args.sleep_n} passes over {args.window} tokens): +{sleep_cost * 1e3:.2f} ms "
          f"({sleeps} sleeps streamed)")
    if args.skip_full_cache:
        return
    full = {p: full_cache_latency(args, p) for p in positions}
    for p in positions:
        print(f"full cache position ~{p:6d}: median step {full[p] * 1e3:7.3f} ms")
    print(f"full cache ratio {positions[-1]}/{positions[0]}: {full[positions[-1]] / full[positions[0]]:.3f}")


if __name__ == "__main__":
    main()
