"""Step time and per-device memory of a preset on 1, 2, 4, 8 (simulated) devices, data-parallel vs FSDP.

    python bench/scale.py                       # paper Rule 110 model (d = 256), batch 64, CPU-simulated devices
    python bench/scale.py --devices=1,2,4,8 --batch_size=512 --model=paper

Each device count runs in its own process (XLA_FLAGS=--xla_force_host_platform_device_count=n on CPU; on a real
multi-device host use --real to take the devices as they are). Memory per device is what XLA's memory analysis of
the compiled train step reports (arguments + temporaries) and the bytes of parameters and optimizer state that
device 0 actually holds.
"""

import argparse
import json
import os
import subprocess
import sys

_CHILD = r"""
import json, sys, time, jax, numpy as np
import sleepjax
from experiments.configs.common import SIZES
from sleepjax import mesh as mesh_lib, tasks
from sleepjax.train import TrainConfig, init_train_state, make_optimizer, train_state_shardings, train_step
args = json.loads(sys.argv[1])
task = tasks.get("rule110", width=24, strings=4, t=4)
model_cfg = sleepjax.ModelConfig(**SIZES[args["model"]], vocab_size=task.vocab_size, window=task.window,
                                 sleep_n=args["sleep_n"])
out = []
for mesh_spec in args["meshes"]:
    cfg = TrainConfig(steps=100, batch_size=args["batch_size"], mesh=mesh_spec)
    mesh = mesh_lib.make_mesh(mesh_spec)
    tx = make_optimizer(cfg)
    abstract = jax.eval_shape(lambda: init_train_state(model_cfg, cfg, tx))
    shard = train_state_shardings(abstract, model_cfg, mesh)
    state = jax.jit(lambda: init_train_state(model_cfg, cfg, tx), out_shardings=shard)()
    bs = mesh_lib.batch_sharding(mesh)
    b = task.batch(0, 0, cfg.batch_size)
    batch = jax.device_put({"tokens": b["tokens"], "loss_mask": b["loss_mask"]}, bs)
    step = jax.jit(lambda s, x: train_step(s, x, tx=tx, sleep_schedule=task.sleep_schedule()),
                   in_shardings=(shard, bs), out_shardings=(shard, mesh_lib.replicated(mesh)), donate_argnums=0)
    with jax.set_mesh(mesh):
        compiled = step.lower(state, batch).compile()
        mem = compiled.memory_analysis()
        state, m = step(state, batch); jax.block_until_ready(m)
        t0 = time.perf_counter()
        for _ in range(args["steps"]):
            state, m = step(state, batch)
        jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / args["steps"]
    dev0 = jax.devices()[0]
    held = sum(s.data.nbytes for x in jax.tree_util.tree_leaves(state) for s in x.addressable_shards
               if s.device == dev0)
    out.append(dict(mesh=mesh_spec, devices=jax.device_count(), step_s=dt, state_bytes_dev0=held,
                    xla_args_bytes=getattr(mem, "argument_size_in_bytes", None),
                    xla_temp_bytes=getattr(mem, "temp_size_in_bytes", None)))
print("RESULT" + json.dumps(out))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", default="1,2,4,8")
    ap.add_argument("--model", default="paper", help="a model size of experiments/configs/common.py")
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--sleep_n", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--real", action="store_true", help="use the host's devices instead of simulated CPU ones")
    args = ap.parse_args()
    print(f"model {args.model}, batch {args.batch_size}, N = {args.sleep_n}")
    print(f"{'devices':>7} {'mesh':>16} {'s/step':>8} {'state MB/dev':>13} {'XLA args MB':>12} {'XLA temp MB':>12}")
    for n in map(int, args.devices.split(",")):
        meshes = ["data:1"] if n == 1 else [f"data:{n}", f"fsdp:{n}"]
        env = dict(os.environ)
        if not args.real:
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
        child = dict(vars(args), meshes=meshes)
        out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(child)], env=env, capture_output=True,
                             text=True)
        if out.returncode:
            print(out.stderr[-2000:])
            continue
        for row in json.loads(out.stdout.split("RESULT")[-1]):
            mb = lambda x: f"{x / 2**20:12.1f}" if x is not None else f"{'?':>12}"
            print(f"{row['devices']:7d} {row['mesh']:>16} {row['step_s']:8.3f} {row['state_bytes_dev0'] / 2**20:13.2f} "
                  f"{mb(row['xla_args_bytes'])} {mb(row['xla_temp_bytes'])}")


if __name__ == "__main__":
    main()
