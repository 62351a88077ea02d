"""Comparison of runs that differ in N, seed or baseline: ``results.md`` and ``accuracy.png``.

Runs are grouped by their label (``label.txt`` in the run directory, written by the launcher: "N = 4",
"transformer (full context)", ...; default "N = <n>"). Over seeds each group reports the mean and the spread
(min-max) per difficulty, every seed's value in a table of its own, and the plot draws the mean with a min-max
band. Wall-clock and the cost of sleep (seconds per step relative to N = 1) are reported beside them; the
checkpoint a fine-tuning run starts from (path, model_type, its layers and width) and the learning rates head the file.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

# Run-directory names and readers live in rundir (the launchers reach these through report).
from sleepjax.rundir import EVAL_SLEEP_N_FILE, EVAL_SLEEP_TOL_FILE, LABEL_FILE, read_eval_sleep_n, read_run_summary, run_label  # noqa: F401


def _groups(runs: list[dict]) -> dict[str, list[dict]]:
    """Runs by label, labels in order of (sleep_n, label), each group's runs by seed."""
    groups = defaultdict(list)
    for run in runs:
        groups[run["label"]].append(run)
    order = sorted(groups, key=lambda label: (min(r["results"]["sleep_n"] for r in groups[label]), label))
    return {label: sorted(groups[label], key=lambda r: r["results"]["seed"]) for label in order}


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
    """One value as is; several as ``mean [min-max]``."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def comparison_table(runs: list[dict], level: float = 0.5) -> str:
    """Markdown table: one row per label; over seeds ``mean [min-max]``."""
    groups = _groups(runs)
    keys = difficulty_keys(runs)
    base = groups.get("N = 1")
    base_known = [r["results"]["seconds_per_step"] for r in base or [] if r["results"]["seconds_per_step"]]
    base_time = np.mean(base_known) if base_known else None  # no timed N = 1 run: no cost column
    head = ["run", "seeds", "sequences", "exact (all)"] + [k.split("/")[1] for k in keys]
    head += [f"hardest >= {level:.0%} (first at)", "s / step", "cost vs N = 1", "wall-clock"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, group in groups.items():
        res = [r["results"] for r in group]
        step_time = [r["seconds_per_step"] for r in res]
        known = [t for t in step_time if t is not None]
        row = [label, ",".join(str(r["seed"]) for r in res), "/".join(sorted({str(r["sequences"]) for r in res})),
               _fmt([r["final_eval"].get("exact") for r in res])]
        row += [_fmt([r["final_eval"].get(k) for r in res], 2) for k in keys]
        row += ["; ".join(hardest_reached(r["evals"], keys, level) for r in group),
                _fmt(step_time, 3),
                f"{np.mean(known) / base_time:.2f}x" if base_time and known else "-",
                _fmt([r["wall_clock_s"] / 60 for r in res], 1) + " min"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def seeds_table(runs: list[dict]) -> str:
    """Every run's final held-out exact accuracy per difficulty (one row per label and seed)."""
    keys = difficulty_keys(runs)
    lines = ["| run | seed | exact (all) | " + " | ".join(k.split("/")[1] for k in keys) + " |",
             "|" + "---|" * (len(keys) + 3)]
    for label, group in _groups(runs).items():
        for run in group:
            final = run["results"]["final_eval"]
            lines.append(f"| {label} | {run['results']['seed']} | {final.get('exact', float('nan')):.3f} | " +
                         " | ".join(f"{final.get(k, float('nan')):.2f}" for k in keys) + " |")
    return "\n".join(lines)


def best_table(runs: list[dict]) -> str:
    """Best held-out exact accuracy per difficulty over each run's evaluations (shows what was learnt at all)."""
    keys = difficulty_keys(runs)
    lines = ["| run | seed | " + " | ".join(f"best {k.split('/')[1]}" for k in keys) + " |",
             "|" + "---|" * (len(keys) + 2)]
    for label, group in _groups(runs).items():
        for run in group:
            best = [max((row.get(k, 0.0) for row in run["evals"]), default=0.0) for k in keys]
            lines.append(f"| {label} | {run['results']['seed']} | " + " | ".join(f"{b:.2f}" for b in best) + " |")
    return "\n".join(lines)


def _curves(group: list[dict], key: str):
    """Training sequences (thousands) and the seeds' accuracies [seeds, points] at the eval points every seed has."""
    common = sorted(set.intersection(*(set(row["sequences"] for row in run["evals"]) for run in group)))
    values = np.array([[next((row.get(key, np.nan) for row in run["evals"] if row["sequences"] == x), np.nan)
                        for x in common] for run in group], dtype=float)
    return np.array(common) / 1e3, values


def plot_accuracy(runs: list[dict], path: str | os.PathLike) -> None:
    """Held-out exact accuracy vs training sequences, one panel per difficulty, one colour per run label: the mean
    over seeds, with a min-max band and error bars at the evaluations when there are several seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = difficulty_keys(runs) or ["exact"]
    groups = _groups(runs)
    colors = {label: plt.get_cmap("viridis")(i / max(len(groups) - 1, 1)) for i, label in enumerate(groups)}
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.2), squeeze=False, sharey=True)
    for ax, key in zip(axes[0], keys):
        for label, group in groups.items():
            xs, values = _curves(group, key)
            if not len(xs):
                continue
            seeds = f" ({len(group)} seeds)" if len(group) > 1 else ""
            mean = np.nanmean(values, axis=0)
            if len(group) > 1:
                low, high = np.nanmin(values, axis=0), np.nanmax(values, axis=0)
                ax.fill_between(xs, low, high, color=colors[label], alpha=0.15, lw=0)
                ax.errorbar(xs, mean, yerr=[mean - low, high - mean], color=colors[label], lw=1.5, capsize=2,
                            elinewidth=0.8, label=label + seeds)
            else:
                ax.plot(xs, mean, color=colors[label], lw=1.5, label=label)
        ax.set_title(key.replace("exact/", ""))
        ax.set_xlabel("training sequences (thousands)")
        ax.grid(alpha=0.3)
        ax.set_ylim(-0.02, 1.02)
    axes[0][0].set_ylabel("held-out exact accuracy")
    axes[0][-1].legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def eval_sleep_n_table(results: list[dict]) -> str:
    """Accuracy per difficulty x test-time N, one row per (run, seed, N); results as in eval_sleep_n.json."""
    keys = sorted({k for r in results for m in r["by_n"].values() for k in m if k.startswith("exact/")},
                  key=lambda k: float(re.sub(r"[^0-9.]", "", k.split("=")[-1]) or 0))
    lines = ["| run | seed | test N | exact (all) | " + " | ".join(k.split("/")[1] for k in keys) + " |",
             "|" + "---|" * (len(keys) + 4)]
    for r in results:
        for n, m in sorted(r["by_n"].items(), key=lambda item: int(item[0])):
            trained = " (trained)" if int(n) == r["trained_n"] else ""
            lines.append(f"| {r['label']} | {r['seed']} | {n}{trained} | {m['exact']:.3f} | " +
                         " | ".join(f"{m.get(k, float('nan')):.2f}" for k in keys) + " |")
    return "\n".join(lines)


def eval_sleep_tol_table(results: list[dict]) -> str:
    """Adaptive depth: accuracy per difficulty and mean passes per tolerance, one row per (run, seed, tol);
    results as in eval_sleep_tol.json."""
    keys = sorted({k for r in results for m in r["by_tol"].values() for k in m if k.startswith("exact/")},
                  key=lambda k: float(re.sub(r"[^0-9.]", "", k.split("=")[-1]) or 0))
    lines = ["| run | seed | tol | max N | mean passes | exact (all) | " + " | ".join(k.split("/")[1] for k in keys)
             + " |", "|" + "---|" * (len(keys) + 6)]
    for r in results:
        for tol, m in sorted(r["by_tol"].items(), key=lambda item: float(item[0])):
            lines.append(f"| {r['label']} | {r['seed']} | {tol} | {r['max_n']} | {m.get('passes_mean', 1.0):.2f} | "
                         f"{m['exact']:.3f} | " + " | ".join(f"{m.get(k, float('nan')):.2f}" for k in keys) + " |")
    return "\n".join(lines)


def setup_lines(runs: list[dict]) -> str:
    """What the runs start from and train at: for fine-tuning runs the checkpoint (path, model_type) and the model
    trained (its layers and width, not a preset's), and every distinct set of learning rates ("" if no run's
    results.json names them)."""
    lines = []
    for start in {json.dumps(r["results"]["init_from"], sort_keys=True): r["results"]["init_from"]
                  for r in runs if r["results"].get("init_from")}.values():
        inserted = (f" ({start['inserted_layers']} inserted {start['insert_kind']})"
                    if start.get("inserted_layers") else "")
        loops = f", {start['loop_steps']} loops per pass" if start.get("loop_steps", 1) > 1 else ""
        lines.append(f"- Fine-tuned from `{start['path']}` (model_type `{start['model_type']}`): "
                     f"{start['num_layers']} layers {', '.join(start['layers'])}{inserted}; d_model "
                     f"{start['d_model']}; vocab {start['vocab_size']}{loops}.")
    rates = {json.dumps(r["results"]["learning_rates"], sort_keys=True): r["results"]["learning_rates"]
             for r in runs if r["results"].get("learning_rates")}
    for rate in rates.values():
        lines.append("- Learning rates: " + ", ".join(f"{k} {v}" for k, v in rate.items()) + ".")
    return "\n".join(lines)


def write_comparison(workdir: str | os.PathLike, run_dirs: list[str | os.PathLike], title: str = "") -> str:
    """Writes ``results.md`` and ``accuracy.png`` in workdir; returns the markdown."""
    runs = [read_run_summary(d) for d in run_dirs]
    workdir = Path(workdir)
    at_n = [r for r in map(read_eval_sleep_n, run_dirs) if r is not None]
    at_n_text = (f"## Evaluated at other N (test-time sleep passes; same weights)\n\n{eval_sleep_n_table(at_n)}\n\n"
                 if at_n else "")
    plot_accuracy(runs, workdir / "accuracy.png")
    setup = setup_lines(runs)
    text = (f"# {title or 'Sleep sweep'}\n\n" + (f"{setup}\n\n" if setup else "") +
            f"Final held-out exact accuracy per run (several seeds: `mean [min-max]`); "
            f"cost = seconds per step relative to N = 1.\n\n{comparison_table(runs)}\n\n"
            f"## Every seed\n\n{seeds_table(runs)}\n\n"
            f"## Best accuracy reached during training\n\n{best_table(runs)}\n\n{at_n_text}"
            f"![held-out exact accuracy (mean over seeds, min-max band)](accuracy.png)\n")
    (workdir / "results.md").write_text(text)
    return text
