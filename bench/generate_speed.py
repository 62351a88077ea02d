"""Greedy decoding speed on CPU: sleepjax.generate beside transformers' generate on the same checkpoints.

    python bench/generate_speed.py                      # both halves, the table at the end (JSON with --out)
    python bench/generate_speed.py --batches=1,4 --new_tokens=64,256 --repeats=3

Checkpoints: the tiny Qwen3 fixture (tests/fixtures/qwen3: d = 24, 3 layers, vocab 128, window 64) and a random
Qwen3-shaped model built here (d = 256, 4 attention layers, 4 query / 2 KV heads of 64, MLP 768, vocab 4096,
window 128), written with sleepjax.pretrained.save so that both libraries read the same weights. Prompts are 16
random tokens; no EOS, so every row generates all its tokens. Timings are the best of ``--repeats`` calls after
one warm-up call (compilation, for sleepjax, is not counted); tokens/s = batch x new tokens / seconds, the prompt
(prefill) included in the seconds.

The transformers half runs in another interpreter (``--python``, default /work/benchvenv/bin/python: torch +
transformers, which the project's environment does not hold) from a directory outside the repository (the
repository's top-level kernels/ would shadow a package transformers imports): ``--mode=transformers`` is that half,
writing JSON. ``--threads=1`` (the default) runs both on one thread (XLA:CPU without its Eigen thread pool,
torch.set_num_threads(1)): on a shared machine the single-thread figures are the stable ones; ``--threads=0`` lets
each use every core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT_LEN = 16
BIG = dict(d_model=256, attn_heads=4, attn_kv_heads=2, attn_head_dim=64, mlp_dim=768, vocab_size=4096, window=128)


def _prompts(batch: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(PROMPT_LEN)] for _ in range(batch)]


def _best(fn, repeats: int) -> float:
    fn()  # warm-up (compiles)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


# ----- the sleepjax half


def _build_big(path: Path) -> None:
    """A random Qwen3-shaped checkpoint (float32) at ``path``, readable by transformers."""
    import jax

    import sleepjax
    from sleepjax import pretrained

    cfg = sleepjax.ModelConfig(layers=("attn",) * 4, qk_norm=True, tie_embeddings=True, rope_theta=1e6,
                               **BIG)
    params = sleepjax.init(cfg, jax.random.PRNGKey(0))
    # init's embedding is N(0, 1): scale it like the other matrices so tied logits stay moderate
    params = params.replace(embed=params.embed * 0.05)
    pretrained.save(params, path)
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = 4096  # transformers' RoPE cache; sleepjax keeps its window from the save
    (path / "config.json").write_text(json.dumps(config, indent=2))


def run_sleepjax(models: dict, batches, new_tokens, repeats: int, sleep_n: int | None) -> list[dict]:
    import sleepjax
    from sleepjax import pretrained

    rows = []
    for name, path in models.items():
        params = pretrained.load(path, **({} if sleep_n is None else {"sleep_n": sleep_n}))
        for batch in batches:
            prompts = _prompts(batch, params.config.vocab_size)
            for new in new_tokens:
                def call():
                    out = sleepjax.generate(params, prompts, new)
                    assert int(out.lengths.min()) == new
                    return out

                seconds = _best(call, repeats)
                rows.append(dict(library="sleepjax", model=name, batch=batch, new_tokens=new, seconds=seconds,
                                 tokens_per_s=batch * new / seconds, window=params.config.window,
                                 sleep_n=params.config.sleep_n, sleeps=int(call().sleeps.max())))
                print(json.dumps(rows[-1]), flush=True)
    return rows


# ----- the transformers half (no jax, no sleepjax: it runs in the benchmark interpreter)


def run_transformers(models: dict, batches, new_tokens, repeats: int, threads: int) -> list[dict]:
    # bench/kernels.py and the repository's kernels/ must not shadow the `kernels` package transformers imports
    sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() not in (REPO, REPO / "bench")]
    import torch
    from transformers import AutoModelForCausalLM

    if threads:
        torch.set_num_threads(threads)
    rows = []
    for name, path in models.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        vocab = model.config.vocab_size
        for batch in batches:
            ids = torch.tensor(_prompts(batch, vocab))
            for new in new_tokens:
                def call():
                    with torch.inference_mode():
                        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                             min_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0,
                                             eos_token_id=None)
                    assert out.shape == (batch, PROMPT_LEN + new)
                    return out

                seconds = _best(call, repeats)
                rows.append(dict(library="transformers", model=name, batch=batch, new_tokens=new, seconds=seconds,
                                 tokens_per_s=batch * new / seconds, threads=torch.get_num_threads()))
                print(json.dumps(rows[-1]), flush=True)
    return rows


def _versions_transformers() -> dict:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} x {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--mode", choices=("both", "sleepjax", "transformers"), default="both")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--new_tokens", default="64,256")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sleep_n", type=int, default=None, help="sleepjax N (default: the checkpoint's, 1)")
    parser.add_argument("--models", default=None, help="JSON {name: dir} (the transformers half gets it)")
    parser.add_argument("--python", default="/work/benchvenv/bin/python", help="the interpreter with transformers")
    parser.add_argument("--out", default=None, help="write the rows (and versions) as JSON here")
    parser.add_argument("--threads", type=int, default=1, help="1: one thread each (default); 0: every core")
    args = parser.parse_args()
    if args.threads == 1 and args.mode != "transformers":  # before jax is imported
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1").strip()
    elif args.threads > 1:
        raise SystemExit("--threads must be 1 or 0 (every core)")
    batches = [int(b) for b in args.batches.split(",")]
    new_tokens = [int(n) for n in args.new_tokens.split(",")]

    if args.mode == "transformers":
        rows = run_transformers(json.loads(args.models), batches, new_tokens, args.repeats, args.threads)
        result = {"rows": rows, "versions": _versions_transformers()}
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))
        return

    with tempfile.TemporaryDirectory() as tmp:
        models = json.loads(args.models) if args.models else None
        if models is None:
            big = Path(tmp) / "qwen3_d256x4"
            _build_big(big)
            models = {"qwen3-fixture (d=24, 3 layers)": str(REPO / "tests" / "fixtures" / "qwen3"),
                      "qwen3-random (d=256, 4 layers)": str(big)}
        rows = []
        import jax

        versions = {"jax": jax.__version__, "cpu": _cpu(), "threads": args.threads or "all"}
        if args.mode in ("both", "sleepjax"):
            rows += run_sleepjax(models, batches, new_tokens, args.repeats, args.sleep_n)
        if args.mode == "both":
            out = Path(tmp) / "transformers.json"
            # -P: the script's own directory (bench/, whose kernels.py shadows the same package) stays off sys.path
            command = [args.python, "-P", str(Path(__file__).resolve()), "--mode=transformers",
                       f"--models={json.dumps(models)}",
                       f"--batches={args.batches}", f"--new_tokens={args.new_tokens}", f"--repeats={args.repeats}",
                       f"--threads={args.threads}", f"--out={out}"]
            done = subprocess.run(command, cwd=tmp, capture_output=True, text=True)  # outside the repository
            if done.returncode:
                print(f"the transformers half failed:\n{done.stderr[-3000:]}", file=sys.stderr)
            else:
                result = json.loads(out.read_text())
                rows += result["rows"]
                versions.update(result["versions"])
    print(f"\nGreedy decoding on {versions['cpu']}; "
          + ", ".join(f"{k} {v}" for k, v in versions.items() if k != "cpu"))
    print(f"prompt {PROMPT_LEN} tokens; tokens/s = batch x new tokens / seconds (best of {args.repeats})\n")
    print("| model | batch | new tokens | sleepjax tok/s | transformers tok/s | ratio |")
    print("|---|---|---|---|---|---|")
    index = {(r["library"], r["model"], r["batch"], r["new_tokens"]): r["tokens_per_s"] for r in rows}
    for (library, model, batch, new), speed in index.items():
        if library != "sleepjax":
            continue
        other = index.get(("transformers", model, batch, new))
        print(f"| {model} | {batch} | {new} | {speed:.0f} | {'-' if other is None else f'{other:.0f}'} | "
              f"{'-' if other is None else f'{speed / other:.2f}'} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "versions": versions}, indent=2))


if __name__ == "__main__":
    main()
