"""Peak training memory and step time of the sleep loop across N and remat policies (XLA's compiled memory
analysis: temporaries of one train step; parameters/optimizer state are the same for every N).

    python bench/sleep_memory.py                                   # Depo tiny_k4's task, batch 32, N = 1, 4, 8
    python bench/sleep_memory.py --remat=pass,both --sleep_n=1,8 --time_steps=5 --json=/tmp/mem.json

``remat="both"`` (a checkpoint around every window AND every pass) keeps, per window, only the carry at the
window's start (fast weights); the backward of a window recomputes its passes and holds one window's N pass carries
at a time, so temporaries grow by one window's carry per pass instead of every window's.
"""

import argparse
import json
import time

import jax

import sleepjax
from experiments.configs.common import SIZES, task_options
from sleepjax import tasks
from sleepjax.train import TrainConfig, init_train_state, make_optimizer, train_step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="depo")
    ap.add_argument("--preset", default="tiny_k4", help="a preset of experiments/configs/<task>.py: its task")
    ap.add_argument("--model", default="tiny", help="a model size of experiments/configs/common.py")
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--sleep_n", default="1,4,8")
    ap.add_argument("--remat", default="pass,both")
    ap.add_argument("--time_steps", type=int, default=0, help="also time this many steps (0: memory only)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    task = tasks.get(args.task, **task_options(args.task, args.preset))
    b = task.batch(0, 0, args.batch_size)
    batch = {"tokens": b["tokens"], "loss_mask": b["loss_mask"]}
    rows = []
    print(f"{args.task}/{args.preset}, model {args.model}, batch {args.batch_size}, device {jax.devices()[0].device_kind}")
    for remat in args.remat.split(","):
        for n in map(int, args.sleep_n.split(",")):
            cfg = sleepjax.ModelConfig(**SIZES[args.model], vocab_size=task.vocab_size, window=task.window, sleep_n=n,
                                       remat=remat)
            tc = TrainConfig(steps=100)
            tx = make_optimizer(tc)
            step = jax.jit(lambda s, x: train_step(s, x, tx=tx, sleep_schedule=task.sleep_schedule()),
                           donate_argnums=0)
            t0 = time.perf_counter()
            compiled = step.lower(jax.eval_shape(lambda: init_train_state(cfg, tc, tx)), batch).compile()
            row = {"remat": remat, "sleep_n": n, "temp_mb": compiled.memory_analysis().temp_size_in_bytes / 1e6,
                   "compile_s": time.perf_counter() - t0}
            if args.time_steps:
                state = init_train_state(cfg, tc, tx)
                state, m = compiled(state, batch)
                jax.block_until_ready(m)
                t0 = time.perf_counter()
                for _ in range(args.time_steps):
                    state, m = compiled(state, batch)
                jax.block_until_ready(m)
                row["ms_per_step"] = (time.perf_counter() - t0) / args.time_steps * 1e3
            base = next((r for r in rows if r["remat"] == remat and r["sleep_n"] == 1), None)
            row["temp_vs_n1"] = row["temp_mb"] / base["temp_mb"] if base else None
            rows.append(row)
            print(f"remat={remat:5s} N={n}: temporaries {row['temp_mb']:6.1f} MB"
                  + (f" ({row['temp_vs_n1']:.2f}x N=1)" if base else "")
                  + (f", {row['ms_per_step']:.1f} ms/step" if "ms_per_step" in row else ""), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
