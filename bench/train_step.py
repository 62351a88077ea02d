"""Seconds per training step of a launcher preset across N, GDN backend and remat policy (CPU or GPU).

    python bench/train_step.py --task=depo --preset=cpu --sleep_n=1,4 --backends=chunked,recurrent --remat=none,pass
"""

import argparse
import itertools
import time

import jax

import sleepjax
from sleepjax import tasks
from sleepjax.train import TrainConfig, init_train_state, make_optimizer, train_step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="depo")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--sleep_n", default="1,4")
    ap.add_argument("--backends", default="chunked,recurrent")
    ap.add_argument("--remat", default="none,pass")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    task = tasks.get(args.task, preset=args.preset)
    batch = task.batch(0, 0, args.batch_size)
    batch = {"tokens": batch["tokens"], "loss_mask": batch["loss_mask"]}
    print(f"{args.task}/{args.preset}: seq_len {task.seq_len}, window {task.window}, batch {args.batch_size}, "
          f"device {jax.devices()[0].device_kind}")
    for n, backend, remat in itertools.product(args.sleep_n.split(","), args.backends.split(","),
                                               args.remat.split(",")):
        cfg = sleepjax.ModelConfig.preset(args.model, vocab_size=task.vocab_size, window=task.window,
                                          sleep_n=int(n), gdn_backend=backend, remat=remat)
        tc = TrainConfig(steps=100)
        tx = make_optimizer(tc)
        state = init_train_state(cfg, tc, tx)
        step = jax.jit(lambda s, b: train_step(s, b, tx=tx), donate_argnums=0)
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, m = step(state, batch)
        jax.block_until_ready(m)
        dt = (time.perf_counter() - t0) / args.steps
        print(f"N={n} gdn={backend:9s} remat={remat:5s}: {dt * 1e3:7.1f} ms/step "
              f"({args.batch_size * task.seq_len / dt / 1e3:.1f}k tok/s), first step {compile_s:.1f} s", flush=True)


if __name__ == "__main__":
    main()
