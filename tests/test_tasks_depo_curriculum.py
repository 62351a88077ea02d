"""The Depo hop curriculum (``hop_stage``): the k range per training example, determinism, and no effect when off."""

import numpy as np
import pytest

from helpers.depo import cpu_depo, follow, parse

STAGE = 5


def hops_of(task, index, split="train"):
    return [int(k) for k in task.example(4, index, split).meta["difficulty"]]


@pytest.mark.parametrize("max_hops", [1, 3, 4])
def test_largest_k_grows_by_one_per_stage(max_hops):
    task = cpu_depo(max_hops=max_hops, hop_stage=STAGE)
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
    task = cpu_depo(hop_stage=3)
    for index in (0, 4, 7, 20):
        ex = task.example(1, index)
        edges, questions = parse(task, ex.tokens)
        for q in questions:
            assert follow(edges, q["query"], q["k"]) == q["answer"]


def test_deterministic_per_seed_and_index():
    a, b = cpu_depo(hop_stage=7), cpu_depo(hop_stage=7)
    for index in (0, 13, 40):
        x, y = a.example(2, index), b.example(2, index)
        assert np.array_equal(x.tokens, y.tokens) and np.array_equal(x.meta["difficulty"], y.meta["difficulty"])
    batch_a, batch_b = a.batch(2, 3, 8), b.batch(2, 3, 8)
    assert all(np.array_equal(batch_a[key], batch_b[key]) for key in batch_a)
    assert not np.array_equal(a.example(2, 13).tokens, a.example(3, 13).tokens)


def test_test_split_and_default_ignore_the_curriculum():
    plain, staged = cpu_depo(), cpu_depo(hop_stage=1000)
    for index in range(8):  # the held-out set is the same with and without a curriculum
        assert np.array_equal(plain.example(0, index, "test").tokens, staged.example(0, index, "test").tokens)
    assert max(k for index in range(20) for k in hops_of(staged, index)) == 1  # still in the first stage
    assert max(k for index in range(20) for k in hops_of(plain, index)) == plain.max_hops
    assert cpu_depo(hop_stage=0).example(0, 5).tokens.tolist() == plain.example(0, 5).tokens.tolist()


@pytest.mark.parametrize("bad", [-1, 2.5, True, "3"])
def test_bad_hop_stage_is_named(bad):
    with pytest.raises(ValueError, match="hop_stage"):
        cpu_depo(hop_stage=bad)


@pytest.mark.parametrize("options", [dict(max_hops=2), dict(max_hops=4), dict(max_hops=2, hop_stage=4),
                                     dict(max_hops=3, min_nodes=3, train_n="uniform", questions=20)])
@pytest.mark.parametrize("split", ["train", "test"])
def test_distinct_questions_repeat_no_pair_before_all_were_asked(options, split):
    task = cpu_depo(distinct_questions="all", **options)
    for index in range(12):
        ex = task.example(6, index, split)
        edges, questions = parse(task, ex.tokens)
        n, asked = ex.meta["n"], [(q["query"], q["k"]) for q in questions]
        for q in questions:
            assert follow(edges, q["query"], q["k"]) == q["answer"]
        if split == "train":  # pairs over all k allowed at this index, counted here from the options
            limit = min(task.max_hops, 1 + index // options["hop_stage"]) if "hop_stage" in options else task.max_hops
            assert max(k for _, k in asked) <= limit
            per_round = n * limit
            for start in range(0, len(asked), per_round):
                chunk = asked[start:start + per_round]
                assert len(set(chunk)) == len(chunk), (index, chunk)
        else:  # the hops are the held-out cycle; per k, no query repeats before all n nodes were asked
            assert [k for _, k in asked] == [int(k) for k in ex.meta["difficulty"]]
            for k in set(k for _, k in asked):
                words = [w for w, kk in asked if kk == k]
                for start in range(0, len(words), n):
                    assert len(set(words[start:start + n])) == len(words[start:start + n])


def test_distinct_questions_keep_graphs_and_default():
    plain, distinct = cpu_depo(), cpu_depo(distinct_questions="all")
    for index in range(4):  # same held-out graphs with and without the option
        a, b = plain.example(0, index, "test"), distinct.example(0, index, "test")
        assert np.array_equal(a.tokens[:plain.context_len], b.tokens[:plain.context_len])
        assert np.array_equal(a.meta["difficulty"], b.meta["difficulty"])
    # without the option, 16 questions over 8 nodes x 4 hops repeat some pair in most examples; with it, none does
    repeats = [len(set(zip(plain.example(1, i).meta["queries"], plain.example(1, i).meta["hops"]))) < 16
               for i in range(20)]
    assert sum(repeats) >= 10
    assert all(len(set(zip(e.meta["queries"], e.meta["hops"]))) == 16
               for e in (distinct.example(1, i) for i in range(20)))
    x, y = distinct.example(3, 7), cpu_depo(distinct_questions="all").example(3, 7)
    assert np.array_equal(x.tokens, y.tokens)
    for bad in (True, "yes", 0):
        with pytest.raises(ValueError, match="distinct_questions"):
            cpu_depo(distinct_questions=bad)


def test_distinct_test_only_changes_held_out_questions_only():
    plain, both = cpu_depo(max_hops=2), cpu_depo(max_hops=2, distinct_questions="all")
    test_only = cpu_depo(max_hops=2, distinct_questions="test")
    for index in range(6):  # training data: exactly the default's
        assert np.array_equal(test_only.example(0, index).tokens, plain.example(0, index).tokens)
        # held-out data: the same as with distinct questions in both splits
        assert np.array_equal(test_only.example(0, index, "test").tokens, both.example(0, index, "test").tokens)
    # held out: every node asked once per k (8 nodes, 16 questions, k alternating 1, 2)
    for index in range(6):
        ex = test_only.example(0, index, "test")
        pairs = set(zip(ex.meta["queries"], ex.meta["hops"]))
        assert len(pairs) == 16
