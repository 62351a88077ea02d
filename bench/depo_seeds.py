"""Across seeds: held-out accuracy of several kinds of run at several test-time N, and a paired test of one
against another (the README's main-job claim: N = 4 minus N = 1 on k = 2, seed by seed).

Reads run directories (``results.json``, ``label.txt``, ``eval_sleep_n.json`` from ``--eval_sleep_n``); a run is
named by its label and scored at a test-time N as ``LABEL@N`` (``N = 4@4``; plain ``LABEL`` is the trained N).

    python bench/depo_seeds.py --runs 'runs/fresh/*' --a 'N = 4' --b 'N = 1' --out docs/depo_out_of_sample
    python bench/depo_seeds.py --runs 'runs/fresh/*,runs/robust/*' --a 'N-robust 1..4@4' --b 'N = 1' --ns 1,2,4,8

Writes OUT.json, OUT.md (the per-seed table, the mean difference with a 95% bootstrap interval over seeds and the
exact two-sided sign test) and OUT.png (accuracy against test-time N per kind, one line per seed).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from run_globs import labelled_runs  # bench/ is on sys.path: these run as scripts


def load(patterns: list[str], metric: str) -> dict[str, dict[int, dict]]:
    """{label: {seed: {"trained": value at the trained N, n: value at test-time n, ...}}}."""
    out: dict[str, dict[int, dict]] = defaultdict(dict)
    # NAME=GLOB names the runs (older runs' labels say less)
    for name, run in labelled_runs(patterns):
        if not (run / "results.json").exists():
            continue
        results = json.loads((run / "results.json").read_text())
        label = name or ((run / "label.txt").read_text().strip() if (run / "label.txt").exists() else run.name)
        if metric.startswith("graph_only/"):  # bench/depo_floor.py's score on the questions only the graph answers
            floor = run / "depo_floor.json"
            if not floor.exists():
                continue
            entry = {"trained": json.loads(floor.read_text())[metric.split("/")[1]]["graph_only"],
                     "trained_n": results["sleep_n"]}
            out[label][int(results["seed"])] = entry
            continue
        entry = {"trained": results["final_eval"][metric], "trained_n": results["sleep_n"]}
        if (run / "eval_sleep_n.json").exists():
            by_n = json.loads((run / "eval_sleep_n.json").read_text())["by_n"]
            entry.update({int(n): m[metric] for n, m in by_n.items()})
        out[label][int(results["seed"])] = entry
    return out


def value(runs: dict, name: str, seed: int) -> float | None:
    label, _, n = name.partition("@")
    entry = runs.get(label, {}).get(seed)
    if entry is None:
        return None
    return entry["trained"] if not n else entry.get(int(n))


def paired(runs: dict, a: str, b: str, resamples: int = 10_000) -> dict:
    seeds = sorted(s for s in set(runs.get(a.partition("@")[0], {})) & set(runs.get(b.partition("@")[0], {}))
                   if value(runs, a, s) is not None and value(runs, b, s) is not None)
    diffs = np.array([value(runs, a, s) - value(runs, b, s) for s in seeds])
    if not len(diffs):
        raise SystemExit(f"no seed has both {a!r} and {b!r}")
    rng = np.random.default_rng(0)
    means = diffs[rng.integers(0, len(diffs), (resamples, len(diffs)))].mean(axis=1)
    wins, losses = int((diffs > 0).sum()), int((diffs < 0).sum())
    m = wins + losses
    tail = sum(math.comb(m, i) for i in range(0, min(wins, losses) + 1)) / 2**m if m else 1.0
    return {"a": a, "b": b, "seeds": seeds, "diffs": diffs.tolist(), "mean": float(diffs.mean()),
            "bootstrap_95": [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))],
            "wins": wins, "losses": losses, "ties": int(len(diffs) - m), "sign_test_p": min(1.0, 2 * tail)}


def table(runs: dict, names: list[str]) -> str:
    seeds = sorted({s for name in names for s in runs.get(name.partition("@")[0], {})})
    lines = ["| run | " + " | ".join(f"seed {s}" for s in seeds) + " | mean [min-max] |",
             "|---|" + "---|" * (len(seeds) + 1)]
    for name in names:
        values = [value(runs, name, s) for s in seeds]
        got = [v for v in values if v is not None]
        summary = f"{np.mean(got):.2f} [{min(got):.2f}-{max(got):.2f}]" if got else "-"
        lines.append(f"| {name} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in values) +
                     f" | {summary} |")
    return "\n".join(lines)


def plot(runs: dict, labels: list[str], ns: list[int], path: Path, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(labels), figsize=(4 * len(labels), 3.4), sharey=True, squeeze=False)
    seeds = sorted({s for label in labels for s in runs[label]})
    for ax, label in zip(axes[0], labels):
        for seed, entry in sorted(runs[label].items()):
            xs = [n for n in ns if n in entry]
            ax.plot(xs, [entry[n] for n in xs], marker="o", alpha=0.6, color=f"C{seeds.index(seed) % 10}",
                    label=f"seed {seed}")
        ax.set_title(label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("test-time N")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"held-out {metric}")
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_lines()}
    axes[0][-1].legend([handles[f"seed {s}"] for s in seeds], [f"seed {s}" for s in seeds], fontsize=7,
                       loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", required=True, help="comma-separated globs of run directories, each optionally "
                        "NAME=GLOB to label its runs NAME")
    parser.add_argument("--a", required=True, help="LABEL or LABEL@N: the run kind tested")
    parser.add_argument("--b", required=True, help="LABEL or LABEL@N: the one it is compared with, seed by seed")
    parser.add_argument("--metric", default="exact/k=2", help="a key of final_eval (default exact/k=2), or "
                        "graph_only/k=K (bench/depo_floor.py's score, trained N only)")
    parser.add_argument("--ns", default="1,2,4,8", help="test-time N for the table and plot")
    parser.add_argument("--out", default=None, help="write OUT.json, OUT.md, OUT.png")
    args = parser.parse_args()
    runs = load(args.runs.split(","), args.metric)
    ns = [int(n) for n in args.ns.split(",") if n]
    result = paired(runs, args.a, args.b)
    labels = sorted(runs)
    names = [f"{label}@{n}" for label in labels for n in ns if any(n in e for e in runs[label].values())]
    text = (f"{args.metric}, trained N:\n\n{table(runs, labels)}\n\nat test-time N:\n\n{table(runs, names)}\n\n"
            f"{args.a} minus {args.b}, {len(result['seeds'])} seeds ({', '.join(map(str, result['seeds']))}): "
            f"mean {result['mean']:+.3f}, 95% bootstrap interval [{result['bootstrap_95'][0]:+.3f}, "
            f"{result['bootstrap_95'][1]:+.3f}]; {result['wins']} wins, {result['losses']} losses, "
            f"{result['ties']} ties; sign test p = {result['sign_test_p']:.3f}")
    print(text)
    if args.out:
        out = Path(args.out)
        out.with_suffix(".json").write_text(json.dumps({"metric": args.metric, "paired": result,
                                                        "runs": {k: {str(s): e for s, e in v.items()}
                                                                 for k, v in runs.items()}}, indent=2) + "\n")
        out.with_suffix(".md").write_text(text + "\n")
        plot(runs, labels, ns, out.with_suffix(".png"), args.metric)


if __name__ == "__main__":
    main()
