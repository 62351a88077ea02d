"""Evaluation per difficulty, counted by hand.

The model is a hand-built bigram predictor: every mixer's and MLP's output projection is zero, so the hidden state
is the token's embedding, and the unembedding maps token a to a logit of C on (a + 1) mod V and 0 elsewhere.
Which positions are predicted right is then chosen when the tokens are written, and every metric below is counted
by hand from that choice, never from the code under test.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sleepjax
from sleepjax.evaluate import evaluate

V, D = 10, 16
LOGIT = 3.0 * 4.0 / math.sqrt(1.0 + 1e-6)  # unembed 3 * RMSNorm(4 e_a) = 4 e_a / sqrt(mean(16 e_a^2)/16 + eps)


def bigram_params():
    cfg = sleepjax.ModelConfig(vocab_size=V, d_model=D, layers=("attn", "gdn"), attn_heads=1, attn_kv_heads=1,
                               attn_head_dim=8, gdn_heads=1, gdn_value_heads=1, gdn_key_dim=8, gdn_value_dim=8,
                               mlp_dim=16, window=6, chunk_size=16, sleep_n=2)
    params = sleepjax.init(cfg, jax.random.PRNGKey(0))
    layers = []
    for p in params.layers:
        p = dict(p, wo=jnp.zeros_like(p["wo"]), mlp=dict(p["mlp"], w_down=jnp.zeros_like(p["mlp"]["w_down"])))
        layers.append(p)
    embed = jnp.zeros((V, D)).at[jnp.arange(V), jnp.arange(V)].set(4.0)
    unembed = jnp.zeros((D, V)).at[jnp.arange(V), (jnp.arange(V) + 1) % V].set(3.0)
    return params.replace(layers=tuple(layers), embed=embed, unembed=unembed)


# Per example: three item slots (positions 1-2, 4-5, 8-9 predict their next tokens), each (difficulty, pattern);
# pattern = which of the item's two positions are predicted right; None = unused slot (difficulty -1).
# Position 6 is supervised too but belongs to no item (token metrics only); it is predicted right.
ITEMS = [
    [(1, "RR"), (2, "RW"), (5, "RR")],
    [(2, "RR"), (1, "WW"), None],
    [(5, "WR"), (5, "RR"), (1, "RR")],
    [(2, "RR"), None, (2, "WW")],
    [(7, "WW"), (1, "RR"), (7, "RR")],
]
SLOTS = [(1, 2), (4, 5), (8, 9)]
T = 12
# Counted by hand from ITEMS (an item is exact only if both of its positions are right):
EXACT = {1: 3 / 4, 2: 2 / 4, 5: 2 / 3, 7: 1 / 2}  # d=1: RR WW RR RR; d=2: RW RR RR WW; d=5: RR WR RR; d=7: WW RR
ITEM_COUNT, EXACT_ALL = 13, 8 / 13
# Cross-entropy of a right and of a wrong position: logits are LOGIT on one token, 0 on the other V - 1.
CE_RIGHT = math.log(math.exp(LOGIT) + V - 1) - LOGIT
CE_WRONG = math.log(math.exp(LOGIT) + V - 1)


def item_ce(pattern):
    return np.mean([CE_RIGHT if c == "R" else CE_WRONG for c in pattern])


def build_batches(batch_size):
    rows = []
    for example, items in enumerate(ITEMS):
        right = np.ones(T - 1, bool)  # right[t]: the prediction at t (of token t+1) is right
        loss_mask, item = np.zeros(T, bool), np.full(T, -1, np.int32)
        difficulty = np.full(3, -1, np.int32)
        for j, (slot, spec) in enumerate(zip(SLOTS, items)):
            if spec is None:
                continue
            difficulty[j] = spec[0]
            for pos, c in zip(slot, spec[1]):
                right[pos] = c == "R"
                loss_mask[pos], item[pos] = True, j
        loss_mask[6] = True
        tokens = [example % V]
        for t in range(T - 1):  # next token = (a + 1) mod V where the prediction must be right, else (a + 3) mod V
            tokens.append((tokens[-1] + (1 if right[t] else 3)) % V)
        rows.append(dict(tokens=np.array(tokens, np.int32), loss_mask=loss_mask, item=item, difficulty=difficulty))
    return [{k: np.stack([r[k] for r in rows[i:i + batch_size]]) for k in rows[0]}
            for i in range(0, len(rows), batch_size)]


def test_exact_and_loss_per_difficulty_counted_by_hand():
    # batches of 2, 2 and 1 examples: the counts must accumulate across batches
    metrics = evaluate(bigram_params(), build_batches(2), num_items=3, difficulty_name="k")
    assert metrics["items"] == ITEM_COUNT
    assert metrics["exact"] == pytest.approx(EXACT_ALL, abs=1e-12)
    assert {k: v for k, v in metrics.items() if k.startswith("exact/")} == pytest.approx(
        {f"exact/k={d}": v for d, v in EXACT.items()}, abs=1e-12)
    losses = {d: [] for d in EXACT}
    for items in ITEMS:
        for spec in items:
            if spec is not None:
                losses[spec[0]].append(item_ce(spec[1]))
    for d, values in losses.items():
        assert metrics[f"loss/k={d}"] == pytest.approx(np.mean(values), rel=1e-4), d
    # token level: every supervised position, position 6 included (always right)
    patterns = "".join(spec[1] for items in ITEMS for spec in items if spec is not None) + "R" * len(ITEMS)
    assert metrics["token_accuracy"] == pytest.approx(patterns.count("R") / len(patterns), abs=1e-6)
    expected_loss = (patterns.count("R") * CE_RIGHT + patterns.count("W") * CE_WRONG) / len(patterns)
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-4)


def test_bigram_model_predicts_what_the_hand_count_assumes():
    """Guards the construction itself: the model's argmax is (a + 1) mod V at every position."""
    params = bigram_params()
    batch = build_batches(2)[0]
    logits = sleepjax.forward(params, jnp.asarray(batch["tokens"]), jnp.asarray(batch["loss_mask"]))
    np.testing.assert_array_equal(np.argmax(np.asarray(logits), -1), (batch["tokens"] + 1) % V)
    np.testing.assert_allclose(np.max(np.asarray(logits), -1), LOGIT, rtol=1e-5)
