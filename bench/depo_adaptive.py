"""Adaptive sleep depth across runs: held-out accuracy against the mean number of passes taken.

Reads each run's ``eval_sleep_tol.json`` (``--eval_sleep_tol``) and, for the fixed-depth points, its
``eval_sleep_n.json`` (``--eval_sleep_n``). Writes OUT.md (one row per run and tolerance) and OUT.png (accuracy
against mean passes: a line per run with adaptive depth, markers at fixed test-time N).

    python bench/depo_adaptive.py --runs 'runs/robust/*' --out docs/depo_adaptive
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from run_globs import labelled_runs  # bench/ is on sys.path: these run as scripts


def load(patterns: list[str], metric: str) -> list[dict]:
    runs = []
    for name, run in labelled_runs(patterns):
        if not (run / "eval_sleep_tol.json").exists():
            continue
        tol = json.loads((run / "eval_sleep_tol.json").read_text())
        fixed = (json.loads((run / "eval_sleep_n.json").read_text())["by_n"]
                 if (run / "eval_sleep_n.json").exists() else {})
        runs.append({"label": name or tol["label"], "seed": tol["seed"], "max_n": tol["max_n"],
                     "adaptive": sorted((float(t), m.get("passes_mean", 1.0), m[metric], m["exact"])
                                        for t, m in tol["by_tol"].items()),
                     "fixed": sorted((int(n), m[metric]) for n, m in fixed.items())})
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", required=True, help="comma-separated globs of run directories (NAME=GLOB names them)")
    parser.add_argument("--metric", default="exact/k=2")
    parser.add_argument("--out", required=True, help="write OUT.md and OUT.png")
    args = parser.parse_args()
    runs = load(args.runs.split(","), args.metric)
    if not runs:
        raise SystemExit(f"--runs: no run directory with eval_sleep_tol.json matches {args.runs!r}")
    lines = [f"| run | seed | max N | tol | mean passes | {args.metric} | exact (all) |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        for tol, passes, value, exact in r["adaptive"]:
            lines.append(f"| {r['label']} | {r['seed']} | {r['max_n']} | {tol:g} | {passes:.2f} | {value:.3f} | "
                         f"{exact:.3f} |")
    tols = sorted({t for r in runs for t, *_ in r["adaptive"]})
    summary = ["| tol | mean passes (mean over runs) | " + f"{args.metric} mean [min-max] |", "|---|---|---|"]
    for tol in tols:
        points = [(p, v) for r in runs for t, p, v, _ in r["adaptive"] if t == tol]
        values = [v for _, v in points]
        summary.append(f"| {tol:g} | {np.mean([p for p, _ in points]):.2f} | {np.mean(values):.3f} "
                       f"[{min(values):.3f}-{max(values):.3f}] |")
    text = "\n".join(summary) + "\n\nEvery run:\n\n" + "\n".join(lines) + "\n"
    out = Path(args.out)
    out.with_suffix(".md").write_text(text)
    print(text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, r in enumerate(runs):
        color = f"C{i % 10}"
        ax.plot([p for _, p, _, _ in r["adaptive"]], [v for _, _, v, _ in r["adaptive"]], "-o", color=color,
                ms=3, label=f"{r['label']} seed {r['seed']}")
        if r["fixed"]:
            ax.plot([n for n, _ in r["fixed"]], [v for _, v in r["fixed"]], "x", color=color, ms=7)
    ax.set_xlabel("mean passes per sleeping window (x: fixed test-time N)")
    ax.set_ylabel(f"held-out {args.metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
