"""Evaluation shared by every task: per-item exact accuracy and loss, grouped by difficulty.

Items and difficulties come from the task (see ``sleepjax/tasks/base.py``): item j of an example is right when
every position of it predicts its next token right (greedy decoding under teacher forcing).
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
    }


_score = jax.jit(score_batch, static_argnames=("num_items", "schedule"))


def evaluate(params, batches, *, num_items: int, difficulty_name: str = "difficulty", put=jnp.asarray,
             schedule: str | None = None) -> dict[str, float]:
    """Metrics over a held-out set (a list of batches from ``task.eval_set``).

    ``exact``: mean exact accuracy over items; ``exact/<name>=<d>`` and ``loss/<name>=<d>`` per difficulty;
    ``loss`` and ``token_accuracy`` over every supervised position; ``items``: how many were scored.
    ``slept_fraction``: of the example-windows with no supervised position, the fraction that slept (N passes).
    ``put`` places a host array on the devices (multi-host runs pass one that builds global arrays).
    ``schedule``: the task's sleep schedule (``Task.sleep_schedule``), used where it fits each batch (M where it
    does not); None derives each batch's own (one compile per distinct schedule).
    """
    exact, ce = defaultdict(list), defaultdict(list)
    token_correct = token_ce = token_count = 0.0
    counts = dict.fromkeys(model_lib.SLEEP_COUNTS, 0.0)
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
    all_exact = [e for values in exact.values() for e in values]
    metrics = {
        "exact": float(np.mean(all_exact)) if all_exact else float("nan"),
        "loss": token_ce / max(token_count, 1.0),
        "token_accuracy": token_correct / max(token_count, 1.0),
        "items": float(len(all_exact)),
        "slept_fraction": model_lib.slept_fraction(counts),
        **counts,
    }
    for d in sorted(exact):
        metrics[f"exact/{difficulty_name}={d}"] = float(np.mean(exact[d]))
        metrics[f"loss/{difficulty_name}={d}"] = float(np.mean(ce[d]))
    return metrics


def evaluate_at_sleep_n(params, batches, ns, **kwargs) -> dict[int, dict[str, float]]:
    """``evaluate`` with the model's N replaced by each n in ``ns`` (test-time N; the weights are unchanged)."""
    return {int(n): evaluate(params.replace(config=params.config.replace(sleep_n=int(n))), batches, **kwargs)
            for n in ns}
