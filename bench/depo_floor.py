"""What Depo's held-out questions can be answered without the graph: the measured floor of the `tiny` main job.

For each held-out question of the eval set (the same examples every run scores: ``eval_seed``, ``eval_size``), the
accuracy of four answerers that never read the edges:

* ``uniform``: any of the n nodes (1/n);
* ``not_query``: any node but the query (a k-hop answer for 0 < k < n is never the query);
* ``not_query_or_next``: for k = 2, any node but the query and the query's successor (an answerer that knows the
  edges but cannot compose two of them);
* ``bayes_blind``: the best possible answerer that never read the edges: the posterior over every single directed
  cycle of the n nodes given all earlier questions *and their answers* in the same example (they are in the stream,
  visible to the model), answering the most probable node (ties split evenly). No model without the graph can do
  better in expectation.

Beside the floors, ``--runs`` scores trained runs (their final checkpoints, at the trained N or ``--sleep_n``) on
the same questions split by what the stream gives away: ``stream_determined`` questions (every cycle consistent
with the earlier questions and answers gives the same answer: the model could answer without the graph) and the
rest, whose answer only the graph (the consolidated fast weights) holds.

    python bench/depo_floor.py --out docs/depo_floor.json       # the tiny preset's eval set
    python bench/depo_floor.py --runs runs/depo/tiny/N1_seed0,runs/depo/tiny/N4_seed0 --sleep_n 1,4
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from experiments.configs import depo as depo_configs
from sleepjax.tasks import depo


FLOOR_FILE = "depo_floor.json"  # written into each scored run directory


def all_cycles(n: int) -> np.ndarray:
    """Successor arrays [C, n] of every single directed cycle over nodes 0..n-1 ((n - 1)! of them)."""
    out = []
    for rest in itertools.permutations(range(1, n)):
        order = (0,) + rest
        succ = np.empty(n, np.int64)
        succ[list(order)] = list(order[1:] + order[:1])
        out.append(succ)
    return np.stack(out)


def hop_table(cycles: np.ndarray, max_k: int) -> np.ndarray:
    """[max_k + 1, C, n]: entry k is succ^k of every node in every cycle."""
    C, n = cycles.shape
    table = [np.broadcast_to(np.arange(n), (C, n))]
    for _ in range(max_k):
        table.append(np.take_along_axis(cycles, table[-1], axis=1))
    return np.stack(table)


def blind_posterior(task: depo.Depo, seed: int, size: int) -> dict[str, np.ndarray]:
    """Per held-out example and question [size, Q]: ``k``, ``blind`` (the Bayes graph-blind answerer's expected
    accuracy) and ``determined`` (the earlier questions and answers leave one possible answer)."""
    n = task.max_nodes
    hops = hop_table(all_cycles(n), task.max_hops)
    out = {name: np.zeros((size, task.questions), dtype) for name, dtype in
           (("k", np.int32), ("blind", np.float64), ("determined", bool))}
    for index in range(size):
        meta = task.example(seed, index, "test").meta
        node = {word: i for i, word in enumerate(meta["cycle"])}
        consistent = np.ones(hops.shape[1], bool)
        for j, (k, q, a) in enumerate(zip(meta["hops"], meta["queries"], meta["answers"])):
            k, q, a = int(k), node[q], node[a]
            votes = np.bincount(hops[k, consistent, q], minlength=n)
            best = np.flatnonzero(votes == votes.max())
            out["k"][index, j] = k
            out["blind"][index, j] = float(a in best) / len(best)
            out["determined"][index, j] = votes[a] == votes.sum()
            consistent &= hops[k, :, q] == a
    return out


def score_runs(run_dirs: list[str], sleep_ns: list[int | None], blind: dict[str, np.ndarray]) -> list[dict]:
    """Each run's exact accuracy per k on every held-out question, on the stream-determined ones and the rest, and
    per question position (``by_position``: k, model accuracy, blind floor)."""
    import jax

    from sleepjax.evaluate import score_batch
    from sleepjax.train import load_run

    scored = jax.jit(score_batch, static_argnames=("num_items", "schedule"))
    results = []
    for run_dir, n in zip(run_dirs, sleep_ns):
        params, model_cfg, train_cfg, task = load_run(run_dir)
        n = n or model_cfg.sleep_n
        params = params.replace(config=model_cfg.replace(sleep_n=n))
        batches = task.eval_set(train_cfg.eval_seed, train_cfg.eval_size, train_cfg.eval_batch_size)
        exact = np.concatenate([np.asarray(scored(params, b["tokens"], b["loss_mask"], b["item"],
                                                  num_items=task.num_items)["exact"]) for b in batches])
        if exact.shape != blind["k"].shape:
            raise ValueError(f"{run_dir}: its held-out set {exact.shape} is not the floors' {blind['k'].shape}")
        row = {"run": str(run_dir), "trained_n": model_cfg.sleep_n, "sleep_n": n}
        for k in np.unique(blind["k"]):
            of_k = blind["k"] == k
            row[f"k={k}"] = {
                "all": float(exact[of_k].mean()),
                "stream_determined": float(exact[of_k & blind["determined"]].mean()),
                "graph_only": float(exact[of_k & ~blind["determined"]].mean()),
                "graph_only_blind_floor": float(blind["blind"][of_k & ~blind["determined"]].mean()),
                "graph_only_share": float((of_k & ~blind["determined"]).sum() / of_k.sum())}
        if task.word_len_max == 1:
            row["answers"] = answer_kinds(params, task, train_cfg.eval_seed, batches)
        row["by_position"] = [{"k": int(blind["k"][0, j]), "exact": float(exact[:, j].mean()),
                               "blind": float(blind["blind"][:, j].mean())} for j in range(exact.shape[1])]
        results.append(row)
        # beside the run's own results, for bench/depo_seeds.py --metric graph_only/k=2
        (Path(run_dir) / FLOOR_FILE).write_text(json.dumps(row, indent=2) + "\n")
    return results


def answer_kinds(params, task: depo.Depo, seed: int, batches) -> dict[str, dict[str, float]]:
    """One-token words only: per k, the fraction of held-out answers the model gives (greedy, teacher-forced) that
    are the node k hops on (right), k - 1, k + 1 or 0 hops on (the query), one hop back, or another node."""
    import jax

    from sleepjax import forward

    run = jax.jit(forward)
    counts: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    index = 0
    for batch in batches:
        predicted = np.asarray(jax.numpy.argmax(run(params, batch["tokens"], batch["loss_mask"]), axis=-1))
        for b in range(len(predicted)):
            meta = task.example(seed, index, "test").meta
            index += 1
            cycle = [task.token_id(word) for word in meta["cycle"]]
            n = len(cycle)
            for j, k in enumerate(meta["hops"]):
                t = int(np.flatnonzero(batch["item"][b] == j)[0])
                q = cycle.index(int(batch["tokens"][b, t - 1]))
                got = int(predicted[b, t])
                kinds = {"right": (q + k) % n, f"{k - 1}_hops": (q + k - 1) % n, f"{k + 1}_hops": (q + k + 1) % n,
                         "back": (q - 1) % n}
                kind = next((name for name, node in kinds.items() if cycle[node] == got), "other")
                counts[int(k)][kind] += 1
    return {f"k={k}": {name: c / sum(kinds.values()) for name, c in sorted(kinds.items())}
            for k, kinds in sorted(counts.items())}


def floors(task: depo.Depo, seed: int, size: int) -> dict:
    n = task.max_nodes
    hops = hop_table(all_cycles(n), task.max_hops)
    scores = defaultdict(lambda: defaultdict(list))
    for index in range(size):
        meta = task.example(seed, index, "test").meta
        node = {word: i for i, word in enumerate(meta["cycle"])}  # the true cycle is i -> i + 1
        consistent = np.ones(hops.shape[1], bool)
        for k, q, a in zip(meta["hops"], meta["queries"], meta["answers"]):
            k, q, a = int(k), node[q], node[a]
            votes = np.bincount(hops[k, consistent, q], minlength=n)
            best = np.flatnonzero(votes == votes.max())
            s = scores[k]
            s["uniform"].append(1.0 / n)
            s["not_query"].append(1.0 / (n - 1))
            if k == 2:
                s["not_query_or_next"].append(1.0 / (n - 2))
            s["bayes_blind"].append(float(a in best) / len(best))
            consistent &= hops[k, :, q] == a  # the answer is in the stream for later questions
    out = {f"k={k}": {name: float(np.mean(v)) for name, v in s.items()} for k, s in sorted(scores.items())}
    every = [x for s in scores.values() for x in s["bayes_blind"]]
    out["all"] = {"bayes_blind": float(np.mean(every)), "questions": len(every)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help="a preset of experiments/configs/depo.py (small n only)")
    parser.add_argument("--out", default=None, help="write the floors here as JSON")
    parser.add_argument("--runs", default="", help="comma-separated run directories to score on the same questions")
    parser.add_argument("--sleep_n", default="", help="comma-separated test-time N per run (default: trained N)")
    args = parser.parse_args()
    runs = [r for r in args.runs.split(",") if r]
    sleep_ns = [int(x) for x in args.sleep_n.split(",") if x] or [None] * len(runs)
    if len(sleep_ns) != len(runs):
        raise SystemExit(f"--sleep_n: one N per run ({len(runs)}), got {args.sleep_n!r}")
    config = depo_configs.get_config(args.preset)
    task = depo.Depo(**dict(config.task))
    if task.max_nodes > 9:
        raise SystemExit(f"--preset: the exact posterior enumerates (n - 1)! cycles; n = {task.max_nodes} is too many")
    train = config.train
    result = {"preset": args.preset, "eval_seed": train.eval_seed, "eval_size": train.eval_size,
              "nodes": task.max_nodes, "floors": floors(task, train.eval_seed, train.eval_size)}
    if runs:
        blind = blind_posterior(task, train.eval_seed, train.eval_size)
        result["stream_determined_share"] = {f"k={k}": float(blind["determined"][blind["k"] == k].mean())
                                             for k in np.unique(blind["k"])}
        result["runs"] = score_runs(runs, sleep_ns, blind)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
