"""A training run directory -> a Hugging Face checkpoint directory (``pretrained.save``'s format).

    python -m sleepjax.export RUN_DIR OUT_DIR [--dtype=bfloat16] [--step=N] [--source=DIR] [--max_shard_bytes=B]

    from sleepjax.export import export_run
    export_run("runs/text/tiny_N2", "/out/finetuned", dtype="bfloat16")

What is written: the run's parameters (the newest checkpoint, or ``step``) as float32 or bfloat16 safetensors,
sharded with ``model.safetensors.index.json`` above ``max_shard_bytes`` (default 5 GB, transformers' own); a
config.json in the model's family format (Qwen3 / Qwen3.5 / Jet-Nemotron load in transformers; a model no
Hugging Face class describes, e.g. with inserted GDN layers, in the ``sleepjax`` format) whose ``sleepjax`` block
records the sleep settings the run trained with (window, sleep_n, sleep_layers, eviction), restored by
``sleepjax.pretrained.load``; and, from the source checkpoint (the run's ``train.init_from``, else the task's
``tokenizer`` option), its tokenizer files, generation_config.json and true ``max_position_embeddings``.

The run's task is not rebuilt (its data files need not exist any more): only config.json and the checkpoint are read.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


def _run_source(saved: dict) -> str | None:
    """The checkpoint (or tokenizer) a run's tokens and weights came from: train.init_from, else the task's
    tokenizer option."""
    return saved["train"].get("init_from") or saved.get("task_options", {}).get("tokenizer") or None


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32",
               step: int | None = None, source: str | os.PathLike | None = None,
               max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES) -> dict:
    """Writes the run at ``run_dir`` (its newest checkpoint, or ``step``) to ``out_dir`` with ``pretrained.save``.

    source: where the tokenizer, generation config and max_position_embeddings come from (default: the run's
    ``init_from``, else its task's ``tokenizer``; none for a run on a task's own vocabulary). Returns what was
    written: family, step, dtype, source, files, and the model's sleep settings.
    """
    from sleepjax import pretrained, rundir
    from sleepjax.config import ModelConfig
    from sleepjax.resume import with_defaults
    from sleepjax.train import TrainConfig, load_params

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    saved = with_defaults(rundir.read_run_record(run_dir))
    if saved is None:
        raise ValueError(f"{str(run_dir)!r} is not a run directory: it has no {rundir.CONFIG}")
    if out_dir.resolve() == run_dir.resolve():
        raise ValueError("out_dir must not be the run directory (its config.json is the run record)")
    model_cfg, train_cfg = ModelConfig(**saved["model"]), TrainConfig(**saved["train"])
    with rundir.open_checkpoints(run_dir) as manager:
        steps = sorted(manager.all_steps())
    if not steps:
        raise ValueError(f"{str(run_dir)!r} holds no checkpoint to export")
    step = steps[-1] if step is None else int(step)
    if step not in steps:
        raise ValueError(f"{str(run_dir)!r} holds no checkpoint at step {step} (it has {steps})")
    if source is None:
        source = _run_source(saved)
        if source is not None and not Path(source).exists():
            raise ValueError(f"the run's source checkpoint {source!r} (train.init_from, or the task's tokenizer) is "
                             f"gone: pass the directory it was moved to as source (--source=DIR)")
    params = load_params(run_dir, model_cfg, train_cfg, step)
    provenance = {"run_dir": str(run_dir.resolve()), "step": step, "task": saved.get("task"),
                  "init_from": train_cfg.init_from or None, "insert_gdn": train_cfg.insert_gdn}
    family = pretrained.save(params, out_dir, source=source, dtype=dtype, max_shard_bytes=max_shard_bytes,
                             provenance=provenance)
    cfg = params.config
    return {"family": family, "step": step, "dtype": dtype, "source": None if source is None else str(source),
            "files": sorted(p.name for p in out_dir.iterdir()),
            "sleep": {k: getattr(cfg, k) for k in pretrained.SLEEP_FIELDS}}


def _summary(out_dir: str, result: dict) -> str:
    sleep = ", ".join(f"{k}={v}" for k, v in result["sleep"].items())
    tokenizer = ("copied from " + result["source"] if "tokenizer.json" in result["files"]
                 else "none (the run used no pretrained tokenizer)")
    lines = [f"exported step {result['step']} ({result['dtype']}, family {result['family']}) to {out_dir}: "
             f"{', '.join(result['files'])}",
             f"  sleep settings recorded in config.json (sleepjax.pretrained.load restores them): {sleep}",
             f"  tokenizer: {tokenizer}"]
    if result["family"] == "sleepjax":
        lines.append("  the sleepjax format: sleepjax.pretrained.load reads it; no transformers class describes this "
                     "model (inserted layers, looping, JetBlocks or swa without Jet-Nemotron's layout)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sleepjax.export", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a training run's workdir (config.json + checkpoints/)")
    parser.add_argument("out_dir", help="the Hugging Face directory to write (created; model files replaced)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="the weights' dtype on disk (default: float32)")
    parser.add_argument("--step", type=int, default=None, help="the checkpoint's step (default: the newest)")
    parser.add_argument("--source", default=None, help="the checkpoint to copy the tokenizer, generation config and "
                        "max_position_embeddings from (default: the run's train.init_from)")
    parser.add_argument("--max_shard_bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES,
                        help=f"shard the safetensors above this size (default: {DEFAULT_MAX_SHARD_BYTES})")
    args = parser.parse_args(argv)
    try:
        result = export_run(args.run_dir, args.out_dir, dtype=args.dtype, step=args.step, source=args.source,
                            max_shard_bytes=args.max_shard_bytes)
    except (ValueError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    print(_summary(args.out_dir, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
