"""Where the extra per-sequence training memory at N > 1 comes from: compiled temporaries of a train step on a
small GDN/attention slice at 1 and 2 sequences, N = 1 and 4, with the model's wake/sleep ``lax.cond`` and without
it (every window then runs its N passes: a diagnostic, not a training mode).

    python bench/cond_memory.py                      # d = 512, 1,000 tokens, windows of 500, remat=both
    python bench/cond_memory.py --remat=pass --batches=1,2,4
"""

import argparse

import jax
import jax.numpy as jnp

import sleepjax
from sleepjax import model as model_lib
from sleepjax.train import TrainConfig, init_train_state, make_optimizer, train_step


def without_cond(run_passes):
    def every_window_sleeps(params, h, state, n, *, active=None, valid=None, context=None):
        return run_passes(params, h, state, n, active=None, valid=valid, context=context)
    return every_window_sleeps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d_model", type=int, default=512)
    ap.add_argument("--seq", type=int, default=1000)
    ap.add_argument("--window", type=int, default=500)
    ap.add_argument("--remat", default="both")
    ap.add_argument("--batches", default="1,2")
    ap.add_argument("--sleep_n", default="1,4")
    args = ap.parse_args()
    tc = TrainConfig(steps=100)
    tx = make_optimizer(tc)
    original = model_lib.run_passes
    for mode in ("with cond", "without cond"):
        model_lib.run_passes = original if mode == "with cond" else without_cond(original)
        for batch in map(int, args.batches.split(",")):
            for n in map(int, args.sleep_n.split(",")):
                cfg = sleepjax.ModelConfig(
                    vocab_size=1000, d_model=args.d_model, layers=("gdn", "gdn", "gdn", "attn"), attn_heads=8,
                    attn_kv_heads=2, attn_head_dim=128, gdn_heads=8, gdn_value_heads=8, gdn_key_dim=128,
                    gdn_value_dim=128, mlp_dim=3 * args.d_model, window=args.window, sleep_n=n, remat=args.remat,
                    dtype="bfloat16", gdn_backend="chunked", attn_backend="xla")
                state = jax.eval_shape(lambda: init_train_state(cfg, tc, tx))
                data = {"tokens": jax.ShapeDtypeStruct((batch, args.seq), jnp.int32),
                        "loss_mask": jax.ShapeDtypeStruct((batch, args.seq), jnp.bool_)}
                compiled = jax.jit(lambda s, b: train_step(s, b, tx=tx)).lower(state, data).compile()
                print(f"{mode:13s} sequences {batch}  N = {n}: temporaries "
                      f"{compiled.memory_analysis().temp_size_in_bytes / 2**20:7.0f} MiB", flush=True)
    model_lib.run_passes = original


if __name__ == "__main__":
    main()
