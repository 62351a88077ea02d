"""Training memory of a pretrained-size hybrid with sleep, per device, from XLA's compiled memory analysis:
compiles (never runs) the train step of a few-layer slice at the real widths, fits temporaries = a + b * layers,
and extrapolates to the full depth. Parameters and optimizer state are counted exactly for the full model.

    python bench/pretrained_memory.py                        # a 2B-class Qwen3.5-style hybrid (our choice of sizes)
    python bench/pretrained_memory.py --depths=4,8 --sleep_n=1,4,8 --batch=1,2 --seq=4000 --window=2000 --json=/tmp/m.json

The default sizes are ours (d = 2048, 24 layers of 3 GDN : 1 gated attention, MLP 6144, vocab 151,936), NOT a
released checkpoint's config: point --from_config at a checkpoint's directory (its config.json: any family
``sleepjax.pretrained`` reads, e.g. Jet-Nemotron, or Ouro with ``--insert_gdn=6 --insert_kind=jet``; a looped model's
slice keeps its loop count) to measure that model instead.
Temporaries are measured at each --batch (sequences per device): the difference between two batch sizes is what
each added sequence costs. Parameters and optimizer state divide by the FSDP size. The step runs the sleep schedule
of its mask (the windows before the answer's sleep: S...SW), as the trainer does for a task with that layout.
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

import sleepjax
from sleepjax import schedule as schedule_lib
from sleepjax.train import TrainConfig, init_train_state, make_optimizer, train_step

PATTERN = ("gdn", "gdn", "gdn", "attn")


def model_config(args, depth: int, sleep_n: int) -> sleepjax.ModelConfig:
    layers = tuple(PATTERN[i % len(PATTERN)] for i in range(depth))
    if args.from_config:
        from sleepjax import pretrained

        base = pretrained.load_config(args.from_config, insert_gdn=args.insert_gdn, insert_kind=args.insert_kind)
        period = len(base.layers)

        def repeated(indices):  # a per-layer index list of the checkpoint, continued over the slice's layers
            return tuple(i for i in range(depth) if i % period in indices)

        return base.replace(layers=tuple(base.layers[i % period] for i in range(depth)), window=args.window,
                            mlp_free_layers=repeated(base.mlp_free_layers),
                            sandwich_norm_layers=repeated(base.sandwich_norm_layers), sleep_n=sleep_n,
                            remat=args.remat, dtype=args.dtype, sleep_layers=None)
    return sleepjax.ModelConfig(
        vocab_size=151_936, d_model=2048, layers=layers, attn_heads=8, attn_kv_heads=2, attn_head_dim=256,
        gdn_heads=16, gdn_value_heads=16, gdn_key_dim=128, gdn_value_dim=128, mlp_dim=6144, window=args.window,
        sleep_n=sleep_n, remat=args.remat, dtype=args.dtype, attn_output_gate=True, qk_norm=True, rope_dim=64,
        norm_weight_offset=1.0, gdn_backend="chunked", attn_backend="xla")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--depths", default="4,8")
    ap.add_argument("--target_layers", type=int, default=24)
    ap.add_argument("--sleep_n", default="1,4,8")
    ap.add_argument("--batch", default="1,2", help="sequences per device (comma-separated)")
    ap.add_argument("--seq", type=int, default=4000)
    ap.add_argument("--window", type=int, default=2000)
    ap.add_argument("--remat", default="both")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--from_config", default=None, help="a checkpoint directory (its config.json)")
    ap.add_argument("--insert_gdn", type=int, default=0, help="with --from_config: layers inserted (fine-tuning)")
    ap.add_argument("--insert_kind", default="gdn", choices=("gdn", "jet"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    tc = TrainConfig(steps=100)
    tx = make_optimizer(tc)
    batches = [int(b) for b in args.batch.split(",")]
    for n in map(int, args.sleep_n.split(",")):
        for batch_size in batches:
            mask = np.zeros((batch_size, args.seq), bool)
            mask[:, args.seq - 8:args.seq - 1] = True  # the answer at the end: the windows before it sleep
            schedule = schedule_lib.derive(mask, args.window)
            batch = {"tokens": jax.ShapeDtypeStruct(mask.shape, jnp.int32),
                     "loss_mask": jax.ShapeDtypeStruct(mask.shape, jnp.bool_)}
            temps = {}
            for depth in map(int, args.depths.split(",")):
                cfg = model_config(args, depth, n)
                state = jax.eval_shape(lambda: init_train_state(cfg, tc, tx))
                step = jax.jit(lambda s, b: train_step(s, b, tx=tx, sleep_schedule=schedule))
                temps[depth] = step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes
                print(f"N={n} batch={batch_size} layers={depth}: temporaries {temps[depth] / 2**30:.2f} GiB",
                      flush=True)
            (d0, t0), (d1, t1) = sorted(temps.items())[:1] + sorted(temps.items())[-1:]
            slope = (t1 - t0) / (d1 - d0)
            full_cfg = model_config(args, args.target_layers, n)
            full = jax.eval_shape(lambda: init_train_state(full_cfg, tc, tx))
            count = sum(x.size for x in jax.tree_util.tree_leaves(full.params))
            state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(full))
            row = {"sleep_n": n, "schedule": schedule, "measured_temporaries": {str(k): v for k, v in temps.items()},
                   "per_layer_bytes": slope, "temporaries_extrapolated": t0 + slope * (args.target_layers - d0),
                   "params": count, "params_and_optimizer_bytes": state_bytes, "batch_per_device": batch_size,
                   "seq": args.seq, "window": args.window, "remat": args.remat, "dtype": args.dtype}
            rows.append(row)
            print(f"N={n}: {count / 1e9:.2f}B parameters, {state_bytes / 2**30:.1f} GiB parameters + optimizer "
                  f"state (float32, unsharded); temporaries at {args.target_layers} layers (extrapolated from "
                  f"{sorted(temps)}): {row['temporaries_extrapolated'] / 2**30:.2f} GiB per {batch_size} "
                  f"sequence(s) of {args.seq} tokens", flush=True)
    if len(batches) > 1:
        lo, hi = min(batches), max(batches)
        print(f"\ntemporaries at {args.target_layers} layers (extrapolated), GiB, and per added sequence:")
        at = {(r["sleep_n"], r["batch_per_device"]): r["temporaries_extrapolated"] / 2**30 for r in rows}
        ns = sorted({r["sleep_n"] for r in rows})
        base_n = ns[0]
        for n in ns:
            added = (at[n, hi] - at[n, lo]) / (hi - lo)
            added_base = (at[base_n, hi] - at[base_n, lo]) / (hi - lo)
            print(f"N={n}: {lo} seq {at[n, lo]:.2f} ({at[n, lo] / at[base_n, lo]:.2f}x N={base_n}), {hi} seq "
                  f"{at[n, hi]:.2f}; per added sequence {added:.2f} ({added / added_base:.2f}x N={base_n})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
