"""A fixed training set counted in epochs (TrainConfig ``train_examples`` / ``epochs`` / ``warmup_epochs``): which
examples each step draws (``sleepjax/tasks/base.py``: ``epoch_order``, ``batch_indices``), the step counts the
epochs set, and one short run of the trainer over a fixed set."""

import dataclasses

import numpy as np
import pytest

import sleepjax.train
from helpers.runs import micro_setup
from sleepjax import tasks
from sleepjax.metrics_log import read_metrics
from sleepjax.tasks.base import batch_indices, epoch_order, stack
from sleepjax.train import TrainConfig, load_run, train

TASK = tasks.get("rule110", width=6, strings=2, t=1)
K, B = 10, 4  # an epoch ends inside a batch (10 is no multiple of 4)


def positions(seed, steps, batch_size=B, train_examples=K):
    """The example indices of steps 0 .. steps - 1, concatenated."""
    return np.concatenate([batch_indices(seed, s, batch_size, train_examples) for s in range(steps)])


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# Catches indices that run past the fixed set (the endless stream kept) or an epoch that repeats or skips examples.
def test_every_example_once_per_epoch_and_none_outside_the_set():
    seen = positions(seed=3, steps=8)  # 32 positions: three whole epochs and 2 of the fourth
    assert seen.min() >= 0 and seen.max() < K
    for epoch in range(3):
        assert sorted(seen[epoch * K:(epoch + 1) * K].tolist()) == list(range(K)), epoch
    assert len(set(seen[3 * K:].tolist())) == 2
    # the batch of step 2 holds positions 8 .. 11: the end of epoch 0 and the start of epoch 1
    np.testing.assert_array_equal(batch_indices(3, 2, B, K),
                                  np.concatenate([epoch_order(3, 0, K)[8:], epoch_order(3, 1, K)[:2]]))
    # and Task.batch stacks exactly those examples
    assert_batches_equal(TASK.batch(3, 2, B, train_examples=K),
                         stack([TASK.example(3, int(i), "train") for i in batch_indices(3, 2, B, K)]))


# Catches one order reused for every epoch or seed (no reshuffle), no shuffle at all, or an order that is not a
# pure function of (seed, epoch) (a stateful generator: a resumed run would see other batches).
def test_epoch_orders_are_shuffled_per_epoch_and_seed_and_pure():
    orders = {(seed, epoch): epoch_order(seed, epoch, K).tolist() for seed in (0, 1) for epoch in (0, 1, 2)}
    assert len({tuple(o) for o in orders.values()}) == len(orders), orders
    assert orders[0, 0] != list(range(K))
    before = positions(seed=0, steps=8)
    epoch_order.cache_clear()  # computed afresh, not read back from the cache
    assert epoch_order(0, 1, K).tolist() == orders[0, 1]
    np.testing.assert_array_equal(positions(seed=0, steps=8), before)
    with pytest.raises(ValueError, match="must be >= 0"):
        batch_indices(0, -1, B, K)


# Catches a host slice that draws other examples than its rows of the single-process batch (multi-host runs).
@pytest.mark.parametrize("rows", [slice(0, 2), slice(2, 4), slice(1, 3)])
def test_rows_are_slices_of_the_full_batch(rows):
    for step in (0, 2, 7):
        full = TASK.batch(5, step, B, train_examples=K)
        part = TASK.batch(5, step, B, rows=rows, train_examples=K)
        assert_batches_equal(part, {key: value[rows] for key, value in full.items()})
        cfg = TrainConfig(batch_size=B, seed=5, train_examples=K)
        assert_batches_equal(sleepjax.train._batch_of(TASK, cfg, rows, step), part)


# Catches any change to the endless stream (train_examples = 0): runs and their resumes must keep their batches.
def test_train_examples_0_keeps_the_stream():
    for step in (0, 1, 6):
        old = stack([TASK.example(2, step * B + i, "train") for i in range(B)])  # the stream, written out
        assert_batches_equal(TASK.batch(2, step, B), old)
        assert_batches_equal(TASK.batch(2, step, B, train_examples=0), old)
        assert_batches_equal(sleepjax.train._batch_of(TASK, TrainConfig(batch_size=B, seed=2), None, step), old)
        np.testing.assert_array_equal(batch_indices(2, step, B), np.arange(step * B, step * B + B))
    assert_batches_equal(TASK.batch(2, 1, B, rows=slice(1, 3)),
                         stack([TASK.example(2, i, "train") for i in (5, 6)]))


# Catches epochs / warmup_epochs left unconverted (or converted with float error), freeze_steps not following the
# warm-up of a frozen fine-tune, a config.json that does not rebuild the same config, and settings that are silently
# accepted though they cannot mean anything.
def test_epochs_set_the_steps_and_bad_settings_are_named():
    cfg = TrainConfig(train_examples=K, epochs=3, batch_size=B, steps=5)
    assert cfg.steps == 8  # ceil(3 * 10 / 4): replaces the steps given
    assert TrainConfig(train_examples=30, epochs=0.1, batch_size=3).steps == 1  # not 2 (0.1 * 30 / 3 in floats)
    assert TrainConfig(train_examples=K, batch_size=B, steps=5).steps == 5  # no epochs: steps as given
    warm = TrainConfig(train_examples=12, epochs=3, warmup_epochs=1, batch_size=B, freeze_steps=7)
    assert (warm.steps, warm.warmup_eviction_steps, warm.freeze_steps) == (9, 3, 7)  # freeze "none": untouched
    frozen = TrainConfig(train_examples=12, epochs=3, warmup_epochs=1, batch_size=B, freeze="pretrained",
                         insert_gdn=1, init_from="/some/checkpoint")
    assert (frozen.warmup_eviction_steps, frozen.freeze_steps) == (3, 3)
    assert TrainConfig(train_examples=12, warmup_epochs=0.5, batch_size=B, steps=50).warmup_eviction_steps == 2
    for built in (cfg, warm, frozen):  # load_run rebuilds the config from config.json's fields
        assert TrainConfig(**dataclasses.asdict(built)) == built
    bad = [(dict(epochs=1), "epochs .*needs train_examples"),
           (dict(warmup_epochs=1), "warmup_epochs .*needs train_examples"),
           (dict(train_examples=K, epochs=2, warmup_epochs=2), r"warmup_epochs \(2\) must be < epochs"),
           (dict(train_examples=-1), "train_examples must be an int >= 0"),
           (dict(train_examples=2.5), "train_examples must be an int >= 0"),
           (dict(train_examples=True), "train_examples must be an int >= 0"),
           (dict(train_examples=K, epochs=-1), "epochs must be a finite number >= 0"),
           (dict(train_examples=K, epochs=float("inf")), "epochs must be a finite number >= 0"),
           (dict(train_examples=K, warmup_epochs="1"), "warmup_epochs must be a finite number >= 0"),
           (dict(train_examples=K, batch_size=64, warmup_epochs=1), "rounds to 0 steps")]
    for fields, message in bad:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**fields)


# Catches a trainer that ignores train_examples (draws from the endless stream) or epochs (runs cfg.steps), and
# progress logs that do not count the epochs.
def test_train_runs_the_epochs_over_the_fixed_set(tmp_path):
    task, model_cfg, cfg = micro_setup(train_examples=6, epochs=2, batch_size=4, steps=40, eval_every=3,
                                       checkpoint_every=3, log_every=1, eval_size=4, eval_batch_size=4)
    assert cfg.steps == 3  # ceil(2 * 6 / 4)
    drawn, example = [], task.example
    task.example = lambda seed, index, split="train": (drawn.append(index) if split == "train" else None) or \
        example(seed, index, split)
    results = train(task, model_cfg, cfg, tmp_path, log_enabled=True)
    assert results["steps"] == 3 and results["epoch"] == 2.0
    assert set(drawn) == set(range(6)), sorted(set(drawn))
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["epoch"]) for r in rows if r["kind"] == "train"] == [(1, 4 / 6), (2, 8 / 6), (3, 2.0)]
    assert [(r["step"], r["epoch"]) for r in rows if r["kind"] == "eval"] == [(3, 2.0)]
    assert load_run(tmp_path)[2] == cfg
