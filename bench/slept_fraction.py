"""Of the example-windows of a task's batches that should sleep (no supervised position), the fraction that did:
each batch runs through the model as the trainer runs it (the task's declared schedule fitted to the batch) and
the passes the model reports are counted (``model.sleep_counts``). A small model: the decision does not depend on
the weights.

    python bench/slept_fraction.py --task=gsm_infinite --preset=paper --batches=4 --batch_size=256
"""

import argparse
import json
import time

import jax
import numpy as np

import sleepjax
from experiments.configs.common import task_options
from sleepjax import model as model_lib
from sleepjax import schedule as schedule_lib
from sleepjax import tasks
from sleepjax.train import TrainConfig


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="gsm_infinite")
    ap.add_argument("--preset", default="paper", help="a preset of experiments/configs/<task>.py: its task")
    ap.add_argument("--task_options", default="{}", help="JSON of task options that replace the preset's")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch_size", type=int, default=256)
    ap.add_argument("--sleep_n", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    task = tasks.get(args.task, **{**task_options(args.task, args.preset), **json.loads(args.task_options)})
    cfg = sleepjax.ModelConfig(vocab_size=task.vocab_size, window=task.window, sleep_n=args.sleep_n, d_model=16,
                               layers=("attn", "gdn"), attn_heads=1, attn_kv_heads=1, attn_head_dim=8, gdn_heads=1,
                               gdn_value_heads=1, gdn_key_dim=8, gdn_value_dim=8, mlp_dim=16)
    params = sleepjax.init(cfg, jax.random.PRNGKey(0))
    declared = task.sleep_schedule(cfg.window)
    stats = jax.jit(lambda p, t, m, s: model_lib.token_stats(p, t, m, schedule=s, return_passes=True)[3],
                    static_argnums=3)
    print(f"{args.task} {args.preset} {args.task_options}: seq_len {task.seq_len}, window {task.window}, "
          f"declared schedule "
          f"{declared}, N = {args.sleep_n}", flush=True)
    out = {}
    for split, seed in (("train", args.seed), ("test", TrainConfig.eval_seed)):
        totals = dict.fromkeys(model_lib.SLEEP_COUNTS, 0)
        for i in range(args.batches):
            t0 = time.perf_counter()
            batch = task.batch(seed, i, args.batch_size, split)
            made = time.perf_counter() - t0
            schedule = schedule_lib.fit(declared, batch["loss_mask"], cfg.window)
            passes = stats(params, batch["tokens"], batch["loss_mask"], schedule)
            counts = {k: int(v) for k, v in model_lib.sleep_counts(cfg, batch["loss_mask"], passes).items()}
            for k in totals:
                totals[k] += counts[k]
            answer_window = np.argmax(batch["loss_mask"], axis=1) // cfg.window
            print(f"{split} batch {i}: schedule {schedule}, {counts}, first supervised window per example "
                  f"{np.bincount(answer_window).tolist()}, made in {made:.1f} s", flush=True)
        out[split] = {**totals, "slept_fraction": model_lib.slept_fraction(totals)}
        print(f"{split}: slept {totals['slept']} of {totals['should_sleep']} example-windows that should have: "
              f"{out[split]['slept_fraction']:.4f}; supervised windows that slept: {totals['slept_supervised']}",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
