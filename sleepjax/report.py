"""Comparison of runs that differ in N (and seed): ``results.md`` and ``accuracy.png``.

Runs are compared at equal training sequences (the paper's x-axis); wall-clock and the cost of sleep (seconds
per step relative to N = 1) are reported beside them.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from sleepjax.metrics_log import read_metrics


def load_run(run_dir: str | os.PathLike) -> dict:
    run_dir = Path(run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "eval"]
    return {"dir": str(run_dir), "results": results, "evals": evals}


def difficulty_keys(runs: list[dict]) -> list[str]:
    keys = {k for run in runs for k in run["results"]["final_eval"] if k.startswith("exact/")}
    return sorted(keys, key=lambda k: float(re.sub(r"[^0-9.]", "", k.split("=")[-1]) or 0))


def hardest_reached(evals: list[dict], keys: list[str], level: float) -> str:
    """The hardest difficulty whose held-out exact accuracy reached ``level``, and the training sequences at
    which it first did (e.g. ``k=2 @ 51k``); "-" if none did."""
    for key in reversed(keys):
        for row in evals:
            if row.get(key, -1) >= level:
                return f"{key.split('/')[1]} @ {row['sequences'] / 1e3:.0f}k"
    return "-"


def _fmt(values, digits=3):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    text = "/".join(f"{v:.{digits}f}" for v in values)
    return f"{np.mean(values):.{digits}f} ({text})" if len(values) > 1 else text


def comparison_table(runs: list[dict], level: float = 0.5) -> str:
    """Markdown table: one row per N (seeds side by side as ``mean (s0/s1/...)``)."""
    by_n = defaultdict(list)
    for run in runs:
        by_n[run["results"]["sleep_n"]].append(run)
    keys = difficulty_keys(runs)
    base = by_n.get(1)
    base_time = np.mean([r["results"]["seconds_per_step"] for r in base]) if base else None
    head = ["N", "seeds", "sequences", "exact (all)"] + [k.split("/")[1] for k in keys]
    head += [f"hardest >= {level:.0%} (first at)", "s / step", "sleep cost", "wall-clock"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in sorted(by_n):
        group = sorted(by_n[n], key=lambda r: r["results"]["seed"])
        res = [r["results"] for r in group]
        step_time = [r["seconds_per_step"] for r in res]
        row = [str(n), ",".join(str(r["seed"]) for r in res), str(res[0]["sequences"]),
               _fmt([r["final_eval"].get("exact") for r in res])]
        row += [_fmt([r["final_eval"].get(k) for r in res], 2) for k in keys]
        row += ["; ".join(hardest_reached(r["evals"], keys, level) for r in group),
                _fmt(step_time, 3),
                f"{np.mean(step_time) / base_time:.2f}x" if base_time else "-",
                _fmt([r["wall_clock_s"] / 60 for r in res], 1) + " min"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def best_table(runs: list[dict]) -> str:
    """Best held-out exact accuracy per difficulty over each run's evaluations (shows what was learnt at all)."""
    keys = difficulty_keys(runs)
    lines = ["| N | seed | " + " | ".join(f"best {k.split('/')[1]}" for k in keys) + " |",
             "|" + "---|" * (len(keys) + 2)]
    for run in sorted(runs, key=lambda r: (r["results"]["sleep_n"], r["results"]["seed"])):
        best = [max((row.get(k, 0.0) for row in run["evals"]), default=0.0) for k in keys]
        lines.append(f"| {run['results']['sleep_n']} | {run['results']['seed']} | " +
                     " | ".join(f"{b:.2f}" for b in best) + " |")
    return "\n".join(lines)


def plot_accuracy(runs: list[dict], path: str | os.PathLike) -> None:
    """Held-out exact accuracy vs training sequences, one panel per difficulty, one colour per N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = difficulty_keys(runs) or ["exact"]
    ns = sorted({r["results"]["sleep_n"] for r in runs})
    colors = {n: plt.get_cmap("viridis")(i / max(len(ns) - 1, 1)) for i, n in enumerate(ns)}
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.2), squeeze=False, sharey=True)
    for ax, key in zip(axes[0], keys):
        labelled = set()
        for run in sorted(runs, key=lambda r: (r["results"]["sleep_n"], r["results"]["seed"])):
            n = run["results"]["sleep_n"]
            xs = [row["sequences"] / 1e3 for row in run["evals"]]
            ys = [row.get(key, np.nan) for row in run["evals"]]
            ax.plot(xs, ys, color=colors[n], alpha=0.85, lw=1.5, label=None if n in labelled else f"N = {n}")
            labelled.add(n)
        ax.set_title(key.replace("exact/", ""))
        ax.set_xlabel("training sequences (thousands)")
        ax.grid(alpha=0.3)
        ax.set_ylim(-0.02, 1.02)
    axes[0][0].set_ylabel("held-out exact accuracy")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_comparison(workdir: str | os.PathLike, run_dirs: list[str | os.PathLike], title: str = "") -> str:
    """Writes ``results.md`` and ``accuracy.png`` in workdir; returns the markdown."""
    runs = [load_run(d) for d in run_dirs]
    workdir = Path(workdir)
    plot_accuracy(runs, workdir / "accuracy.png")
    text = (f"# {title or 'Sleep sweep'}\n\nFinal held-out exact accuracy per N at an equal number of training "
            f"sequences (several seeds: `mean (seed values)`); sleep cost = seconds per step relative to N = 1.\n\n"
            f"{comparison_table(runs)}\n\n## Best accuracy reached during training\n\n{best_table(runs)}\n\n"
            f"![held-out exact accuracy](accuracy.png)\n")
    (workdir / "results.md").write_text(text)
    return text
