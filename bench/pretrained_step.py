"""One training step of a small Qwen3.5 checkpoint: sleepjax (per remat policy) against transformers' PyTorch model,
both in this process, same weights, same tokens, AdamW on both sides (issue 17).

    python bench/pretrained_step.py --out /tmp/pretrained_step.json            # d = 256, batch 2 x 1,024
    python bench/pretrained_step.py --quick                                    # a smoke run (tiny sizes, 2 steps)

Needs torch and transformers, which are NOT sleepjax dependencies: run it from a separate venv, e.g.

    python3 -m venv /work/benchvenv && /work/benchvenv/bin/pip install -e '.[test]' torch==2.13.0 transformers

What it does: builds a ``Qwen3_5ForCausalLM`` with random weights (fixed seed; 3 GDN + 1 gated attention layers by
default) in a temporary directory, saves it with ``save_pretrained`` (safetensors + config.json), loads it with
``sleepjax.pretrained.load`` (one window holds the whole sequence, N = 1) and with transformers' ``from_pretrained``,
checks both give the same loss on the batch, then times full train steps (forward, backward, AdamW update), the
loss on every position. Timed rounds are interleaved (each round runs one step of every side, in a rotating order),
so both sides see the same machine load; the table reports the median and the minimum over rounds, after warm-up
steps, and each side's ratio to torch of both. Both sides run on ``--threads`` CPU threads (torch.set_num_threads;
XLA's CPU client via its flags).

On a machine shared with other jobs the median is not a speed: torch's OpenMP threads wait for each other at
every op, so a core taken by another process slows torch far more than XLA (medians of 10-30 s against 0.65 s
were seen for the same torch step). The table prints the load average around the timed rounds; trust medians only
when it stays near ``--threads``, and compare minimums otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time

# bench/kernels.py would shadow the ``kernels`` package that transformers imports: drop this script's folder.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--d_model", type=int, default=256)
    ap.add_argument("--layers", default="gdn,gdn,gdn,attn", help="comma-separated gdn / attn, in order")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--mlp_dim", type=int, default=1024)
    ap.add_argument("--attn_heads", type=int, default=4)
    ap.add_argument("--attn_kv_heads", type=int, default=2)
    ap.add_argument("--attn_head_dim", type=int, default=64)
    ap.add_argument("--gdn_heads", type=int, default=2, help="GDN query/key heads")
    ap.add_argument("--gdn_value_heads", type=int, default=4)
    ap.add_argument("--gdn_key_dim", type=int, default=64)
    ap.add_argument("--gdn_value_dim", type=int, default=64)
    ap.add_argument("--tie", action=argparse.BooleanOptionalAction, default=True, help="tie the LM head to the embedding")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--window", type=int, default=None, help="sleepjax window (default: --seq, one window)")
    ap.add_argument("--remat", default="none,pass,window,both", help="sleepjax remat policies to time")
    ap.add_argument("--gdn_backend", default="auto", help="sleepjax GDN backend (ModelConfig.gdn_backend)")
    ap.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True, help="time transformers too")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per side after compilation")
    ap.add_argument("--steps", type=int, default=7, help="timed rounds (one step of every side per round)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay (torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, 1 warm-up step, 2 rounds")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.quick:
        args.d_model, args.vocab, args.mlp_dim, args.seq = 64, 256, 128, 128
        args.attn_head_dim, args.gdn_key_dim, args.gdn_value_dim = 16, 16, 16
        args.warmup, args.steps = 1, 2
    args.window = args.window or args.seq
    args.layers = tuple(args.layers.split(","))
    if any(kind not in ("gdn", "attn") for kind in args.layers):
        ap.error(f"--layers must list gdn / attn, got {args.layers}")
    return args


def set_threads(threads: int) -> None:
    """XLA reads its flags when the CPU client starts: this must run before jax is imported."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "intra_op_parallelism_threads" not in flags:
        flags += f" --xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={threads}"
    os.environ["XLA_FLAGS"] = flags.strip()
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def import_torch():
    try:
        import torch
        import transformers
    except ImportError as e:  # not sleepjax dependencies
        sys.exit(f"bench/pretrained_step.py needs torch and transformers ({e}); install them in a separate venv:\n"
                 "  python3 -m venv /work/benchvenv && /work/benchvenv/bin/pip install -e '.[test]' "
                 "torch==2.13.0 transformers\n(--no-torch still needs both: the checkpoint is built with "
                 "transformers)")
    if not hasattr(transformers, "Qwen3_5ForCausalLM"):
        sys.exit(f"transformers {transformers.__version__} has no Qwen3_5ForCausalLM: upgrade it")
    return torch, transformers


# ---------------------------------------------------------------------------------------------------------------
# The checkpoint


def hf_config(args, transformers):
    kinds = {"gdn": "linear_attention", "attn": "full_attention"}
    return transformers.Qwen3_5TextConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.mlp_dim,
        num_hidden_layers=len(args.layers), layer_types=[kinds[k] for k in args.layers],
        num_attention_heads=args.attn_heads, num_key_value_heads=args.attn_kv_heads, head_dim=args.attn_head_dim,
        linear_num_key_heads=args.gdn_heads, linear_num_value_heads=args.gdn_value_heads,
        linear_key_head_dim=args.gdn_key_dim, linear_value_head_dim=args.gdn_value_dim, linear_conv_kernel_dim=4,
        rms_norm_eps=1e-6, max_position_embeddings=max(args.seq, args.window), tie_word_embeddings=args.tie,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.25,
                         "mrope_section": [1, 1, 0], "mrope_interleaved": True},
    )


def randomise(model, torch, seed: int) -> None:
    """Every parameter drawn from a fixed generator, at scales a trained model has (decays spread out, norms near
    their defaults, projections ~ 1/sqrt(fan_in))."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            shape = p.shape
            normal = torch.randn(shape, generator=gen, dtype=torch.float32)
            uniform = torch.rand(shape, generator=gen, dtype=torch.float32)
            if name.endswith("A_log"):
                value = torch.log(1.0 + 15.0 * uniform)
            elif name.endswith("dt_bias"):
                dt = torch.exp(math.log(1e-3) + (math.log(0.1) - math.log(1e-3)) * uniform)
                value = dt + torch.log(-torch.expm1(-dt))
            elif name.endswith("conv1d.weight"):
                value = (2.0 * uniform - 1.0) / math.sqrt(shape[-1])
            elif name.endswith("linear_attn.norm.weight"):
                value = 1.0 + 0.1 * normal
            elif p.ndim == 1:  # Qwen3.5 RMSNorm: x * (1 + w)
                value = 0.1 * normal
            elif name.endswith("embed_tokens.weight") or name.endswith("lm_head.weight"):
                value = 0.02 * normal
            else:
                value = normal / math.sqrt(shape[-1])
            p.copy_(value)


def build_checkpoint(args, path, torch, transformers) -> None:
    torch.manual_seed(args.seed)
    model = transformers.Qwen3_5ForCausalLM(hf_config(args, transformers)).to(torch.float32)
    randomise(model, torch, args.seed)
    model.save_pretrained(path, safe_serialization=True)


def batch_tokens(args):
    import numpy as np

    rng = np.random.default_rng(args.seed + 1)
    return rng.integers(0, args.vocab, size=(args.batch, args.seq), dtype=np.int32)


# ---------------------------------------------------------------------------------------------------------------
# The two sides: each a callable running one train step and returning its loss (a float, after the step finished)


def sleepjax_side(args, path, tokens, remat: str):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import sleepjax
    import sleepjax.kernels.gdn
    import sleepjax.pretrained
    from sleepjax import pretrained
    from sleepjax.train import TrainState, train_step

    params = pretrained.load(path, window=args.window, sleep_n=1, gdn_backend=args.gdn_backend)
    params = params.replace(config=params.config.replace(remat=remat))
    tx = optax.adamw(args.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=args.weight_decay)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    batch = {"tokens": jnp.asarray(tokens), "loss_mask": jnp.ones(tokens.shape, bool)}
    step = jax.jit(lambda s, b: train_step(s, b, tx=tx), donate_argnums=0)
    initial_loss = float(jax.jit(sleepjax.loss)(params, batch["tokens"], batch["loss_mask"])[0])
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        return float(np.asarray(metrics["loss"]))

    t0 = time.perf_counter()
    run()
    return run, initial_loss, time.perf_counter() - t0


def torch_side(args, path, tokens, torch, transformers):
    model = transformers.Qwen3_5ForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=args.weight_decay)
    ids = torch.from_numpy(tokens.astype("int64"))
    with torch.no_grad():
        initial_loss = float(model(input_ids=ids, labels=ids).loss)

    def run():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        return float(loss.detach())

    t0 = time.perf_counter()
    run()
    return run, initial_loss, time.perf_counter() - t0, getattr(model.config, "_attn_implementation", "?")


# ---------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    set_threads(args.threads)
    torch, transformers = import_torch()
    torch.set_num_threads(args.threads)
    import jax

    import sleepjax
    import sleepjax.kernels.gdn
    import sleepjax.pretrained

    tokens = batch_tokens(args)
    sides, info = {}, {}
    with tempfile.TemporaryDirectory() as path:
        build_checkpoint(args, path, torch, transformers)
        cfg = sleepjax.pretrained.load_config(path, window=args.window)
        for remat in args.remat.split(","):
            run, loss0, first = sleepjax_side(args, path, tokens, remat)
            sides[f"sleepjax remat={remat}"] = run
            info[f"sleepjax remat={remat}"] = {"initial_loss": loss0, "first_step_s": first}
        if args.torch:
            run, loss0, first, attn = torch_side(args, path, tokens, torch, transformers)
            sides["transformers (torch)"] = run
            info["transformers (torch)"] = {"initial_loss": loss0, "first_step_s": first, "attn_implementation": attn}
    losses = [v["initial_loss"] for v in info.values()]
    if max(losses) - min(losses) > 1e-3 * max(abs(x) for x in losses):
        print(f"WARNING: the sides disagree on the initial loss: { {k: v['initial_loss'] for k, v in info.items()} }")

    names = list(sides)
    for _ in range(args.warmup):
        for name in names:
            sides[name]()
    times = {name: [] for name in names}
    load_before = os.getloadavg()[0]
    for r in range(args.steps):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate: nobody always runs right after torch
        for name in order:
            t0 = time.perf_counter()
            sides[name]()
            times[name].append(time.perf_counter() - t0)
    load_after = os.getloadavg()[0]

    shape = (f"d={args.d_model} layers={','.join(args.layers)} vocab={args.vocab} mlp={args.mlp_dim} "
             f"attn {args.attn_heads}x{args.attn_head_dim} (kv {args.attn_kv_heads}) "
             f"gdn {args.gdn_heads}/{args.gdn_value_heads} heads {args.gdn_key_dim}/{args.gdn_value_dim} "
             f"tie={args.tie}; batch {args.batch} x {args.seq}, window {args.window}, N=1")
    print(f"{shape}\n{args.threads} threads; {platform.processor() or platform.machine()}; jax {jax.__version__}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}; GDN backend {cfg.gdn_backend}"
          f"->{sleepjax.kernels.gdn.default_backend() if cfg.gdn_backend == 'auto' else cfg.gdn_backend}; "
          f"{args.steps} rounds after {args.warmup} warm-up steps; load average {load_before:.1f} -> {load_after:.1f}")
    torch_times = times.get("transformers (torch)")
    print(f"{'side':28s} {'median s':>9s} {'min s':>7s} {'max s':>7s} {'median/torch':>12s} {'min/torch':>9s} "
          f"{'first s':>8s} {'loss0':>8s}")
    rows = []
    for name in names:
        med, low = statistics.median(times[name]), min(times[name])
        ratio = med / statistics.median(torch_times) if torch_times else float("nan")
        ratio_min = low / min(torch_times) if torch_times else float("nan")
        print(f"{name:28s} {med:9.3f} {low:7.3f} {max(times[name]):7.3f} {ratio:12.2f} {ratio_min:9.2f} "
              f"{info[name]['first_step_s']:8.1f} {info[name]['initial_loss']:8.4f}")
        rows.append({"side": name, "median_s": med, "min_s": low, "times_s": times[name], "ratio_to_torch": ratio,
                     "min_ratio_to_torch": ratio_min, **info[name]})
    if args.out:
        result = {"setting": shape, "args": {k: v for k, v in vars(args).items()}, "threads": args.threads,
                  "load_average": [load_before, load_after],
                  "sleepjax": os.path.dirname(sleepjax.__file__),
                  "versions": {"jax": jax.__version__, "torch": torch.__version__,
                               "transformers": transformers.__version__, "python": platform.python_version()},
                  "rows": rows}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
