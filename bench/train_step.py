"""Seconds per training step of a task across N, GDN backend and remat policy (CPU or GPU), beside the FLOP
ratio the sleep schedule implies (``model.layer_passes``): the step at N costs what its schedule says.

    python bench/train_step.py --task=depo --preset=tiny --layers=attn,gdn --batch_size=16 --sleep_n=1,4 \
        --remat=pass                                                        # the README's main job (Depo tiny)
    python bench/train_step.py --task=depo --sleep_n=1,4 --backends=chunked,recurrent --remat=none,pass

Every configuration is compiled first; then the timed steps go round the configurations in turn (``--rounds`` of
``--steps`` each), so a busy machine slows them alike; medians per configuration are reported.
"""

import argparse
import itertools
import json
import statistics
import time

import jax

import sleepjax
from experiments.configs.common import SIZES, task_options
from sleepjax import model as model_lib
from sleepjax import tasks
from sleepjax.train import TrainConfig, init_train_state, make_optimizer, train_step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="depo")
    ap.add_argument("--preset", default="tiny_k4", help="a preset of experiments/configs/<task>.py: its task")
    ap.add_argument("--task_options", default="{}", help="JSON of task options that replace the preset's")
    ap.add_argument("--model", default="tiny", help="a model size of experiments/configs/common.py")
    ap.add_argument("--layers", default=None, help="comma-separated layer kinds (default: the model size's)")
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--sleep_n", default="1,4")
    ap.add_argument("--backends", default="auto")
    ap.add_argument("--remat", default="pass")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    task = tasks.get(args.task, **{**task_options(args.task, args.preset), **json.loads(args.task_options)})
    batch = task.batch(0, 0, args.batch_size)
    batch = {"tokens": batch["tokens"], "loss_mask": batch["loss_mask"]}
    schedule = task.sleep_schedule()
    print(f"{args.task} {args.preset} {args.task_options}: seq_len {task.seq_len}, window {task.window}, "
          f"schedule {schedule}, "
          f"batch {args.batch_size}, device {jax.devices()[0].device_kind}")
    overrides = {"layers": tuple(args.layers.split(","))} if args.layers else {}
    runs = []
    for n, backend, remat in itertools.product(args.sleep_n.split(","), args.backends.split(","),
                                               args.remat.split(",")):
        cfg = sleepjax.ModelConfig(**{**SIZES[args.model], **overrides}, vocab_size=task.vocab_size,
                                   window=task.window, sleep_n=int(n), gdn_backend=backend, remat=remat)
        tc = TrainConfig(steps=100)
        tx = make_optimizer(tc)
        step = jax.jit(lambda s, b, tx=tx: train_step(s, b, tx=tx, sleep_schedule=schedule), donate_argnums=0)
        state = init_train_state(cfg, tc, tx)
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        runs.append({"sleep_n": int(n), "backend": backend, "remat": remat, "first_step_s": time.perf_counter() - t0,
                     "layer_passes": model_lib.layer_passes(cfg, batch["loss_mask"], schedule), "times": [],
                     "step": step, "state": state})
    for _ in range(args.rounds):
        for run in runs:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                run["state"], m = run["step"](run["state"], batch)
            jax.block_until_ready(m)
            run["times"].append((time.perf_counter() - t0) / args.steps)
    rows = []
    for run in runs:
        ms = statistics.median(run["times"]) * 1e3
        base = next(r for r in runs if r["backend"] == run["backend"] and r["remat"] == run["remat"])
        base_ms = statistics.median(base["times"]) * 1e3
        flop_ratio = run["layer_passes"] / base["layer_passes"]
        row = {k: run[k] for k in ("sleep_n", "backend", "remat", "first_step_s", "layer_passes")}
        row.update(ms_per_step=ms, time_ratio=ms / base_ms, flop_ratio=flop_ratio,
                   tokens_per_s=args.batch_size * task.seq_len / ms * 1e3)
        rows.append(row)
        print(f"N={run['sleep_n']} gdn={run['backend']:9s} remat={run['remat']:5s}: {ms:7.1f} ms/step "
              f"({row['tokens_per_s'] / 1e3:.1f}k tok/s), first step {run['first_step_s']:.1f} s; vs N="
              f"{base['sleep_n']}: time {row['time_ratio']:.2f}x, FLOPs {flop_ratio:.2f}x "
              f"(time / FLOPs {row['time_ratio'] / flop_ratio:.2f})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
