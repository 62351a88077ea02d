"""Evaluation shared by every task: per-item exact accuracy and loss, grouped by difficulty.

Items and difficulties come from the task (see ``sleepjax/tasks/base.py``): item j of an example is right when
every position of it predicts its next token right (greedy decoding under teacher forcing). ``evaluate_generation``
scores the same items by free generation (the model writes the answer from its prompt with ``sleepjax.generate``)
beside that teacher-forced score.
"""

from __future__ import annotations

from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np

from sleepjax import model as model_lib
from sleepjax import schedule as schedule_lib


def score_batch(params, tokens, loss_mask, item, num_items: int, schedule: str | None = None):
    """Per-example, per-item results on device. Returns dict of [B, Q] arrays: ``exact`` (bool), ``ce`` (mean
    cross-entropy of the item's positions), ``present`` (the item exists), plus token-level sums and the
    ``model.sleep_counts`` of the batch. ``schedule``: the sleep schedule to run (must fit the batch)."""
    ce, correct, mask, passes = model_lib.token_stats(params, tokens, loss_mask, schedule=schedule,
                                                      return_passes=True)
    onehot = (item[:, :-1, None] == jnp.arange(num_items)).astype(jnp.float32)  # [B, T-1, Q]
    count = onehot.sum(1)
    wrong = jnp.einsum("btq,bt->bq", onehot, 1.0 - correct.astype(jnp.float32))
    ce_sum = jnp.einsum("btq,bt->bq", onehot, ce)
    return {
        "exact": (wrong == 0) & (count > 0),
        "ce": ce_sum / jnp.maximum(count, 1.0),
        "present": count > 0,
        "token_correct": (correct * mask).sum(),
        "token_ce": (ce * mask).sum(),
        "token_count": mask.sum(),
        **model_lib.sleep_counts(params.config, loss_mask, passes),
        "passes_hist": model_lib.pass_histogram(params.config, loss_mask, passes),
    }


_score = jax.jit(score_batch, static_argnames=("num_items", "schedule"))


def evaluate(params, batches, *, num_items: int, difficulty_name: str = "difficulty", put=jnp.asarray,
             schedule: str | None = None) -> dict[str, float]:
    """Metrics over a held-out set (a list of batches from ``task.eval_set``).

    ``exact``: mean exact accuracy over items; ``exact/<name>=<d>`` and ``loss/<name>=<d>`` per difficulty;
    ``loss`` and ``token_accuracy`` over every supervised position; ``items``: how many were scored.
    ``slept_fraction``: of the example-windows with no supervised position, the fraction that slept (N passes).
    ``passes_mean`` and ``passes_hist/<p>`` (p = 1..N): the passes those example-windows ran (``model.pass_summary``;
    with adaptive depth, where each stopped).
    ``put`` places a host array on the devices (multi-host runs pass one that builds global arrays).
    ``schedule``: the task's sleep schedule (``Task.sleep_schedule``), used where it fits each batch (M where it
    does not); None derives each batch's own (one compile per distinct schedule).
    """
    exact, ce = defaultdict(list), defaultdict(list)
    token_correct = token_ce = token_count = 0.0
    counts = dict.fromkeys(model_lib.SLEEP_COUNTS, 0.0)
    histogram = np.zeros(params.config.sleep_n, np.int64)
    window = params.config.window
    for batch in batches:
        mask = batch["loss_mask"]
        run_schedule = schedule_lib.fit(schedule, mask, window) if schedule else schedule_lib.derive(mask, window)
        out = jax.device_get(_score(params, put(batch["tokens"]), put(mask), put(batch["item"]),
                                    num_items=num_items, schedule=run_schedule))
        present = out["present"] & (batch["difficulty"] >= 0)
        for d, e, c in zip(batch["difficulty"][present], out["exact"][present], out["ce"][present]):
            exact[int(d)].append(bool(e))
            ce[int(d)].append(float(c))
        token_correct += float(out["token_correct"])
        token_ce += float(out["token_ce"])
        token_count += float(out["token_count"])
        for key in counts:
            counts[key] += float(out[key])
        histogram += np.asarray(out["passes_hist"], np.int64)
    all_exact = [e for values in exact.values() for e in values]
    metrics = {
        "exact": float(np.mean(all_exact)) if all_exact else float("nan"),
        "loss": token_ce / max(token_count, 1.0),
        "token_accuracy": token_correct / max(token_count, 1.0),
        "items": float(len(all_exact)),
        "slept_fraction": model_lib.slept_fraction(counts),
        **counts,
        **model_lib.pass_summary(histogram),
    }
    for d in sorted(exact):
        metrics[f"exact/{difficulty_name}={d}"] = float(np.mean(exact[d]))
        metrics[f"loss/{difficulty_name}={d}"] = float(np.mean(ce[d]))
    return metrics


def evaluate_at_sleep_n(params, batches, ns, **kwargs) -> dict[int, dict[str, float]]:
    """``evaluate`` with the model's N replaced by each n in ``ns`` (test-time N; the weights are unchanged)."""
    return {int(n): evaluate(params.replace(config=params.config.replace(sleep_n=int(n))), batches, **kwargs)
            for n in ns}


def evaluate_at_sleep_tol(params, batches, tols, max_n: int, **kwargs) -> dict[float, dict[str, float]]:
    """``evaluate`` with adaptive sleep depth: at most ``max_n`` passes, each example-window stopping once a pass
    changes its fast weights by less than tol (``ModelConfig.sleep_tol``), for each tol in ``tols`` (0: always
    max_n). The metrics include ``passes_mean`` and ``passes_hist/<p>``: accuracy against the passes it took."""
    return {float(tol): evaluate(params.replace(config=params.config.replace(sleep_n=int(max_n),
                                                                             sleep_tol=float(tol))),
                                 batches, **kwargs)
            for tol in tols}


# ---------------------------------------------------------------------------------------------------------------
# Free generation: the answer the model writes by itself, beside the teacher-forced score

# Which windows sleep while generating: "always" every full window (what ``sleepjax.generate`` does: the model at
# inference cannot know which windows a task supervises); "unsupervised" Algorithm 1 as in training and in the
# teacher-forced score: a window with a supervised position (the prompt's earlier answers, the answer's own
# windows) closes without sleeping.
GENERATION_SLEEP = ("always", "unsupervised")


def answer_spans(item, num_items: int) -> list[tuple[int, int, np.ndarray]]:
    """(row, item j, positions) of every present item of a batch's ``item`` [B, T]: the positions t (in order)
    whose predictions of tokens[t + 1] make item j's answer."""
    item = np.asarray(item)
    spans = []
    for b in range(item.shape[0]):
        for j in range(num_items):
            positions = np.flatnonzero(item[b, :-1] == j)
            if positions.size:
                spans.append((b, j, positions))
    return spans


def score_generation(params, batch, *, num_items: int, sleep: str = "always",
                     max_new_tokens: int | None = None) -> dict[str, np.ndarray]:
    """Per-example, per-item results of free (greedy) generation on a task batch (host arrays ``tokens``,
    ``loss_mask``, ``item``). Item j of row b, whose answer is predicted at positions s..e: the prompt is
    tokens[b, :s + 1] (everything before the first supervised position, and that position's token), the model
    generates e - s + 1 tokens greedily, and the item is ``exact`` when they equal tokens[s + 1 .. e + 1] at every
    position of the item. Returns ``exact`` and ``present`` (bool [B, Q]) and ``generated`` (int32 [B, Q, n],
    -1 where no item). ``sleep``: see ``GENERATION_SLEEP``. One compiled call per (batch shape, answer length
    rounded up to a power of two): every item of the batch is one row of it."""
    from sleepjax.generate import generate

    if sleep not in GENERATION_SLEEP:
        raise ValueError(f"sleep must be one of {GENERATION_SLEEP}, got {sleep!r}")
    tokens, loss_mask = np.asarray(batch["tokens"], np.int32), np.asarray(batch["loss_mask"], bool)
    B, T = tokens.shape
    spans = answer_spans(batch["item"], num_items)
    exact, present = np.zeros((B, num_items), bool), np.zeros((B, num_items), bool)
    longest = max([int(p[-1] - p[0]) + 1 for _, _, p in spans] or [1])
    new = max_new_tokens or 1 << (longest - 1).bit_length()
    generated = np.full((B, num_items, new), -1, np.int32)
    if not spans:
        return {"exact": exact, "present": present, "generated": generated}
    if new < longest:
        raise ValueError(f"max_new_tokens={new} is shorter than the longest answer ({longest} tokens)")
    # One row per item slot of the batch (B * Q rows, so the compiled shape is the batch's): unused rows are a
    # one-token prompt whose output is ignored.
    rows = np.zeros((B * num_items, T), np.int32)
    lengths = np.ones(B * num_items, np.int32)
    for b, j, positions in spans:
        rows[b * num_items + j] = tokens[b]
        lengths[b * num_items + j] = positions[0] + 1
    wake = np.repeat(loss_mask, num_items, axis=0) if sleep == "unsupervised" else None
    out = generate(params, rows, new, lengths=lengths, wake=wake, consolidate=sleep == "always")
    for b, j, positions in spans:
        row = out.tokens[b * num_items + j]
        generated[b, j] = row
        exact[b, j] = bool(np.all(row[positions - positions[0]] == tokens[b, positions + 1]))
        present[b, j] = True
    return {"exact": exact, "present": present, "generated": generated}


def evaluate_generation(params, batches, *, num_items: int, difficulty_name: str = "difficulty",
                        sleep: str = "always", teacher_forced: bool = True, put=jnp.asarray,
                        schedule: str | None = None) -> dict[str, float]:
    """Exact accuracy by free generation beside the teacher-forced one, over a held-out set (``task.eval_set``).

    ``exact_generated``: the fraction of items whose answer greedy generation from the item's prompt writes
    exactly (``score_generation``); ``exact_teacher_forced``: the fraction whose every position is predicted right
    under teacher forcing (``evaluate``'s ``exact``); both also per difficulty (``exact_generated/<name>=<d>``,
    ``exact_teacher_forced/<name>=<d>``); ``items``. With ``sleep="unsupervised"`` the two runs sleep in the same
    windows, and they agree item by item (an answer is generated exactly iff each of its tokens is the argmax given
    the right ones before it); with ``"always"`` (inference) they differ where a window holding a supervised position
    fills (N > 1). ``teacher_forced`` False: the generated half only (a caller that already ran ``evaluate`` on
    the batches has its ``exact``). ``put``, ``schedule``: as in ``evaluate`` (the teacher-forced half)."""
    by_mode = {"generated": defaultdict(list)}
    if teacher_forced:
        by_mode["teacher_forced"] = defaultdict(list)
    window = params.config.window
    for batch in batches:
        free = score_generation(params, batch, num_items=num_items, sleep=sleep)
        present = free["present"] & (np.asarray(batch["difficulty"]) >= 0)
        results = [("generated", free["exact"])]
        if teacher_forced:
            mask = batch["loss_mask"]
            run_schedule = schedule_lib.fit(schedule, mask, window) if schedule else schedule_lib.derive(mask, window)
            forced = jax.device_get(_score(params, put(batch["tokens"]), put(mask), put(batch["item"]),
                                           num_items=num_items, schedule=run_schedule))
            results.append(("teacher_forced", forced["exact"]))
        for mode, values in results:
            for d, e in zip(np.asarray(batch["difficulty"])[present], np.asarray(values)[present]):
                by_mode[mode][int(d)].append(bool(e))
    metrics = {"items": float(sum(len(v) for v in by_mode["generated"].values()))}
    for mode, exact in by_mode.items():
        values = [e for v in exact.values() for e in v]
        metrics[f"exact_{mode}"] = float(np.mean(values)) if values else float("nan")
        for d in sorted(exact):
            metrics[f"exact_{mode}/{difficulty_name}={d}"] = float(np.mean(exact[d]))
    return metrics
