"""Training memory of a pretrained-size hybrid with sleep, per device, from XLA's compiled memory analysis:
compiles (never runs) the train step of a few-layer slice at the real widths, fits temporaries = a + b * layers,
and extrapolates to the full depth. Parameters and optimizer state are counted exactly for the full model.

    python bench/pretrained_memory.py                        # a 2B-class Qwen3.5-style hybrid (our choice of sizes)
    python bench/pretrained_memory.py --depths=4,8 --sleep_n=1,4 --seq=4000 --window=2000 --json=/tmp/m.json

The default sizes are ours (d = 2048, 24 layers of 3 GDN : 1 gated attention, MLP 6144, vocab 151,936), NOT a
released checkpoint's config: point --from_config at a checkpoint's config.json to measure that model instead.
Temporaries scale with the batch per device (measured at --batch); parameters and optimizer state divide by the
FSDP size.
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

import sleepjax
from sleepjax.train import TrainConfig, init_train_state, make_optimizer, train_step

PATTERN = ("gdn", "gdn", "gdn", "attn")


def model_config(args, depth: int, sleep_n: int) -> sleepjax.ModelConfig:
    layers = tuple(PATTERN[i % len(PATTERN)] for i in range(depth))
    if args.from_config:
        from sleepjax import pretrained

        base = pretrained.load_config(args.from_config)
        return base.replace(layers=tuple(base.layers[i % len(base.layers)] for i in range(depth)), window=args.window,
                            sleep_n=sleep_n, remat=args.remat, dtype=args.dtype, sleep_layers=None)
    return sleepjax.ModelConfig(
        vocab_size=151_936, d_model=2048, layers=layers, attn_heads=8, attn_kv_heads=2, attn_head_dim=256,
        gdn_heads=16, gdn_value_heads=16, gdn_key_dim=128, gdn_value_dim=128, mlp_dim=6144, window=args.window,
        sleep_n=sleep_n, remat=args.remat, dtype=args.dtype, attn_output_gate=True, qk_norm=True, rope_dim=64,
        norm_weight_offset=1.0, gdn_backend="chunked", attn_backend="xla")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--depths", default="4,8")
    ap.add_argument("--target_layers", type=int, default=24)
    ap.add_argument("--sleep_n", default="1,4")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=4000)
    ap.add_argument("--window", type=int, default=2000)
    ap.add_argument("--remat", default="both")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--from_config", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    tokens = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)
    mask = np.zeros((args.batch, args.seq), bool)
    mask[:, args.seq - 8:args.seq - 1] = True  # the answer at the end: the windows before it sleep
    rows = []
    tc = TrainConfig(steps=100)
    tx = make_optimizer(tc)
    for n in map(int, args.sleep_n.split(",")):
        temps = {}
        for depth in map(int, args.depths.split(",")):
            cfg = model_config(args, depth, n)
            state = jax.eval_shape(lambda: init_train_state(cfg, tc, tx))
            batch = {"tokens": tokens, "loss_mask": jax.ShapeDtypeStruct(mask.shape, jnp.bool_)}
            compiled = jax.jit(lambda s, b: train_step(s, b, tx=tx)).lower(state, batch).compile()
            temps[depth] = compiled.memory_analysis().temp_size_in_bytes
            print(f"N={n} layers={depth}: temporaries {temps[depth] / 2**30:.2f} GiB", flush=True)
        (d0, t0), (d1, t1) = sorted(temps.items())[:1] + sorted(temps.items())[-1:]
        slope = (t1 - t0) / (d1 - d0)
        full_cfg = model_config(args, args.target_layers, n)
        full = jax.eval_shape(lambda: init_train_state(full_cfg, tc, tx))
        count = sum(x.size for x in jax.tree_util.tree_leaves(full.params))
        state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(full))
        row = {"sleep_n": n, "measured_temporaries": {str(k): v for k, v in temps.items()},
               "per_layer_bytes": slope, "temporaries_extrapolated": t0 + slope * (args.target_layers - d0),
               "params": count, "params_and_optimizer_bytes": state_bytes, "batch_per_device": args.batch,
               "seq": args.seq, "window": args.window, "remat": args.remat, "dtype": args.dtype}
        rows.append(row)
        print(f"N={n}: {count / 1e9:.2f}B parameters, {state_bytes / 2**30:.1f} GiB parameters + optimizer state "
              f"(float32, unsharded); temporaries at {args.target_layers} layers (extrapolated from "
              f"{sorted(temps)}): {row['temporaries_extrapolated'] / 2**30:.2f} GiB per {args.batch} sequence(s) "
              f"of {args.seq} tokens", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
