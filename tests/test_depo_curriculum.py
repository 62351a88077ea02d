"""The Depo hop curriculum (``hop_stage``): the k range per training example, determinism, and no effect when off."""

import numpy as np
import pytest

from sleepjax.tasks.depo import Depo
from test_depo import follow, parse

STAGE = 5


def hops_of(task, index, split="train"):
    return [int(k) for k in task.example(4, index, split).meta["difficulty"]]


@pytest.mark.parametrize("max_hops", [1, 3, 4])
def test_largest_k_grows_by_one_per_stage(max_hops):
    task = Depo(preset="cpu", max_hops=max_hops, hop_stage=STAGE)
    for index in range(STAGE * (max_hops + 2)):
        limit = min(max_hops, 1 + index // STAGE)  # written out here, not read from the task
        hops = hops_of(task, index)
        assert min(hops) >= 1 and max(hops) <= limit, (index, limit, hops)
    # every k of a stage does get asked once that stage has begun (16 questions x 5 examples per stage)
    for stage in range(max_hops):
        seen = {k for index in range(stage * STAGE, (stage + 1) * STAGE) for k in hops_of(task, index)}
        assert seen == set(range(1, stage + 2)), (stage, seen)
    late = {k for index in range(STAGE * max_hops, STAGE * max_hops + 10) for k in hops_of(task, index)}
    assert late == set(range(1, max_hops + 1))


def test_answers_still_follow_the_cycle():
    task = Depo(preset="cpu", hop_stage=3)
    for index in (0, 4, 7, 20):
        ex = task.example(1, index)
        edges, questions = parse(task, ex.tokens)
        for q in questions:
            assert follow(edges, q["query"], q["k"]) == q["answer"]


def test_deterministic_per_seed_and_index():
    a, b = Depo(preset="cpu", hop_stage=7), Depo(preset="cpu", hop_stage=7)
    for index in (0, 13, 40):
        x, y = a.example(2, index), b.example(2, index)
        assert np.array_equal(x.tokens, y.tokens) and np.array_equal(x.meta["difficulty"], y.meta["difficulty"])
    batch_a, batch_b = a.batch(2, 3, 8), b.batch(2, 3, 8)
    assert all(np.array_equal(batch_a[key], batch_b[key]) for key in batch_a)
    assert not np.array_equal(a.example(2, 13).tokens, a.example(3, 13).tokens)


def test_test_split_and_default_ignore_the_curriculum():
    plain, staged = Depo(preset="cpu"), Depo(preset="cpu", hop_stage=1000)
    for index in range(8):  # the held-out set is the same with and without a curriculum
        assert np.array_equal(plain.example(0, index, "test").tokens, staged.example(0, index, "test").tokens)
    assert max(k for index in range(20) for k in hops_of(staged, index)) == 1  # still in the first stage
    assert max(k for index in range(20) for k in hops_of(plain, index)) == plain.max_hops
    assert Depo(preset="cpu", hop_stage=0).example(0, 5).tokens.tolist() == plain.example(0, 5).tokens.tolist()


@pytest.mark.parametrize("bad", [-1, 2.5, True, "3"])
def test_bad_hop_stage_is_named(bad):
    with pytest.raises(ValueError, match="hop_stage"):
        Depo(preset="cpu", hop_stage=bad)
