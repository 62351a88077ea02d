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


def score_batch(params, tokens, loss_mask, item, num_items: int):
    """Per-example, per-item results on device. Returns dict of [B, Q] arrays: ``exact`` (bool), ``ce`` (mean
    cross-entropy of the item's positions), ``present`` (the item exists), plus token-level sums."""
    ce, correct, mask = model_lib.token_stats(params, tokens, loss_mask)
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
    }


_score = jax.jit(score_batch, static_argnames="num_items")


def evaluate(params, batches, *, num_items: int, difficulty_name: str = "difficulty",
             put=jnp.asarray) -> dict[str, float]:
    """Metrics over a held-out set (a list of batches from ``task.eval_set``).

    ``exact``: mean exact accuracy over items; ``exact/<name>=<d>`` and ``loss/<name>=<d>`` per difficulty;
    ``loss`` and ``token_accuracy`` over every supervised position; ``items``: how many were scored.
    ``put`` places a host array on the devices (multi-host runs pass one that builds global arrays).
    """
    exact, ce = defaultdict(list), defaultdict(list)
    token_correct = token_ce = token_count = 0.0
    for batch in batches:
        out = jax.device_get(_score(params, put(batch["tokens"]), put(batch["loss_mask"]), put(batch["item"]),
                                    num_items=num_items))
        present = out["present"] & (batch["difficulty"] >= 0)
        for d, e, c in zip(batch["difficulty"][present], out["exact"][present], out["ce"][present]):
            exact[int(d)].append(bool(e))
            ce[int(d)].append(float(c))
        token_correct += float(out["token_correct"])
        token_ce += float(out["token_ce"])
        token_count += float(out["token_count"])
    all_exact = [e for values in exact.values() for e in values]
    metrics = {
        "exact": float(np.mean(all_exact)) if all_exact else float("nan"),
        "loss": token_ce / max(token_count, 1.0),
        "token_accuracy": token_correct / max(token_count, 1.0),
        "items": float(len(all_exact)),
    }
    for d in sorted(exact):
        metrics[f"exact/{difficulty_name}={d}"] = float(np.mean(exact[d]))
        metrics[f"loss/{difficulty_name}={d}"] = float(np.mean(ce[d]))
    return metrics


def evaluate_at_sleep_n(params, batches, ns, **kwargs) -> dict[int, dict[str, float]]:
    """``evaluate`` with the model's N replaced by each n in ``ns`` (test-time N; the weights are unchanged)."""
    return {int(n): evaluate(params.replace(config=params.config.replace(sleep_n=int(n))), batches, **kwargs)
            for n in ns}
