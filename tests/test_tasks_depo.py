import math
from collections import Counter

import numpy as np
import pytest

from experiments.configs.depo import CPU_TASK
from sleepjax import tasks
from sleepjax.tasks.base import check_example
from sleepjax.tasks.depo import Depo
from helpers.depo import cpu_depo, follow, parse

ODD_OPTIONS = [
    # mixed 1- and 2-token words, SEP, BOS, a small alphabet and a question region of several windows
    dict(max_nodes=12, min_nodes=2, max_hops=5, alphabet=6, word_len_min=1, word_len_max=2, questions=7,
         window=20, context_len=80, sep=True, bos=True),
    # one question per window, the last window shorter than the others
    dict(max_nodes=5, max_hops=3, alphabet=3, word_len_min=1, word_len_max=2, questions=3, window=7,
         context_len=28, bos=True, train_n="uniform"),
    # 1-token words without separators: the edge list is a plain run of end tokens
    dict(max_nodes=10, min_nodes=4, max_hops=9, alphabet=12, word_len_min=1, word_len_max=1, questions=5,
         window=10, context_len=30),
]
CONFIGS = [dict(), CPU_TASK] + ODD_OPTIONS  # the paper's setting (Depo's defaults), the CPU-scale one


@pytest.mark.parametrize("options", CONFIGS)
@pytest.mark.parametrize("split", ["train", "test"])
def test_answers_match_independent_solver(options, split):
    task = Depo(**options)
    for index in range(4):
        ex = task.example(11, index, split)
        check_example(task, ex)
        edges, questions = parse(task, ex.tokens)
        assert len(questions) == task.questions == task.num_items
        expected_mask = np.zeros(task.seq_len, dtype=bool)
        for j, q in enumerate(questions):
            assert follow(edges, q["query"], q["k"]) == q["answer"]
            assert 1 <= q["k"] <= task.max_hops and ex.meta["difficulty"][j] == q["k"]
            # no question crosses a window boundary
            assert q["start"] // task.window == (q["end"] - 1) // task.window
            # loss on the prediction of ANS and of every answer token; the item only on the answer tokens
            expected_mask[q["ans_pos"] - 1:q["end"] - 1] = True
            assert np.flatnonzero(ex.meta["item"] == j).tolist() == list(range(q["ans_pos"], q["end"] - 1))
            assert " ".join(q["answer"]) == ex.meta["answers"][j]
        assert np.array_equal(ex.loss_mask, expected_mask)


@pytest.mark.parametrize("options", CONFIGS)
def test_edges_form_one_cycle_over_distinct_words(options):
    task = Depo(**options)
    for split in ("train", "test"):
        for index in range(4):
            ex = task.example(2, index, split)
            edges, _ = parse(task, ex.tokens)
            n = ex.meta["n"]
            sources = [src for src, _ in edges]
            assert len(edges) == n and len(set(sources)) == n and {dst for _, dst in edges} == set(sources)
            successor, word, seen = dict(edges), sources[0], []
            for _ in range(n):
                seen.append(word)
                word = successor[word]
            assert word == sources[0] and len(set(seen)) == n  # one cycle through all n words
            lengths = {len(w) for w in sources}
            assert min(lengths) >= task.word_len_min and max(lengths) <= task.word_len_max
            assert len(ex.meta["cycle"]) == n


@pytest.mark.parametrize("options", CONFIGS)
def test_context_region_is_consolidated_whole_windows(options):
    task = Depo(**options)
    assert task.context_len % task.window == 0
    ex = task.example(0, 0)
    assert not ex.loss_mask[:task.context_len].any()
    # the tokens before the edges are PAD, or BOS first when bos=True
    assert (task.vocab[ex.tokens[0]] == "BOS") == task.bos


def test_paper_and_cpu_layouts():
    paper = Depo()
    assert (paper.seq_len, paper.window, paper.context_len, paper.num_items) == (360, 75, 300, 10)
    assert paper.vocab[:5] == ("PAD", "BOS", "SEP", "ANS", "HOP1") and len(paper.vocab) == 4 + 16 + 50 + 50
    assert paper.test_hops == (1, 2, 4, 8, 16)
    cpu = cpu_depo()
    assert (cpu.seq_len, cpu.window, cpu.context_len, cpu.num_items) == (88, 24, 24, 16)
    assert cpu.test_hops == (1, 2, 3, 4)
    assert cpu_depo(test_hops="powers").test_hops == (1, 2, 4)
    ex = cpu.example(0, 0)
    assert "PAD" not in cpu.decode(ex.tokens[:24]).split()  # 8 edges `src dst SEP` fill the window exactly
    assert ex.meta["n"] == 8 and set(ex.meta["difficulty"]) <= {1, 2, 3, 4}
    assert cpu_depo(questions=6).seq_len == 48
    assert isinstance(tasks.get("depo", **CPU_TASK), Depo)


def test_deterministic_and_index_dependent():
    task = cpu_depo()
    a, b = task.example(1, 9, "train"), task.example(1, 9, "train")
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.loss_mask, b.loss_mask)
    assert a.meta["cycle"] == b.meta["cycle"]
    assert not np.array_equal(a.tokens, task.example(1, 10, "train").tokens)
    assert not np.array_equal(a.tokens, task.example(1, 9, "test").tokens)


@pytest.mark.parametrize("options", [dict(), CPU_TASK])
def test_test_split_uses_all_nodes_and_balanced_hops(options):
    task = Depo(**options)
    examples = [task.example(5, i, "test") for i in range(len(task.test_hops) * 2)]
    assert all(ex.meta["n"] == task.max_nodes for ex in examples)
    counts = Counter(int(k) for ex in examples for k in ex.meta["difficulty"])
    assert set(counts) == set(task.test_hops)
    assert len(set(counts.values())) == 1


def test_train_hops_cover_one_to_max():
    task = Depo()
    hops = {int(k) for i in range(20) for k in task.example(0, i, "train").meta["difficulty"]}
    assert hops == set(range(1, 17))


def test_weighted_train_n_distribution():
    max_nodes, min_nodes, samples = 9, 3, 3000
    task = Depo(max_nodes=max_nodes, min_nodes=min_nodes, max_hops=2, alphabet=10, word_len_min=1, word_len_max=1,
                questions=1, window=4, context_len=20)
    counts = Counter(task.example(0, i, "train").meta["n"] for i in range(samples))
    weights = {i: 1 / (i + math.sqrt(max_nodes)) for i in range(min_nodes, max_nodes + 1)}
    total = sum(weights.values())
    for i, weight in weights.items():
        assert abs(counts[i] / samples - weight / total) < 0.03, (i, counts[i] / samples, weight / total)
    uniform = Depo(max_nodes=max_nodes, min_nodes=min_nodes, max_hops=2, alphabet=10, word_len_min=1,
                   word_len_max=1, questions=1, window=4, context_len=20, train_n="uniform")
    assert np.allclose(uniform.train_n_probs, 1 / (max_nodes - min_nodes + 1))


@pytest.mark.parametrize("options, name", [
    (dict(max_nodes=1), "max_nodes"),
    (dict(max_nodes=7.5), "max_nodes"),
    (dict(min_nodes=1), "min_nodes"),
    (dict(min_nodes=80), "min_nodes"),
    (dict(max_hops=0), "max_hops"),
    (dict(alphabet=0), "alphabet"),
    (dict(alphabet=8), "alphabet"),  # 64 two-token words < 75 nodes
    (dict(word_len_min=0), "word_len_min"),
    (dict(word_len_max=1), "word_len_max"),  # below word_len_min = 2
    (dict(questions=0), "questions"),
    (dict(window=5), "window"),  # a 6-token question does not fit
    (dict(context_len=301), "context_len"),
    (dict(context_len=150), "context_len"),  # too short for 75 edges
    (dict(bos=True), "context_len"),  # 300 edge tokens + BOS
    (dict(sep=1), "sep"),
    (dict(bos="no"), "bos"),
    (dict(train_n="log"), "train_n"),
    (dict(test_hops="some"), "test_hops"),
])
def test_bad_options(options, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        Depo(**options)


def chi_square_p(counts, expected):
    """p-value of Pearson's chi-square statistic (df = bins - 1)."""
    from scipy.stats import chi2

    counts, expected = np.asarray(counts, float), np.asarray(expected, float)
    return float(chi2.sf(np.sum((counts - expected) ** 2 / expected), len(counts) - 1))


def test_edges_are_listed_in_shuffled_order_not_cycle_order():
    """In a uniformly shuffled edge list of an n-cycle, two consecutive edges are adjacent on the cycle (one's
    dst is the other's src, either way round) with probability 2/(n-1); in cycle order (or its reverse, or a
    rotation of it) always. And the edge leaving the cycle's first word sits at a uniform position."""
    task = cpu_depo()  # n = 8
    n, examples = task.max_nodes, 300
    adjacent = pairs = 0
    first_edge_position = Counter()
    for index in range(examples):
        ex = task.example(3, index, "train")
        edges, _ = parse(task, ex.tokens)
        for (s1, d1), (s2, d2) in zip(edges, edges[1:]):
            adjacent += d1 == s2 or d2 == s1
            pairs += 1
        cycle = ex.meta["cycle"]
        first_edge_position[[" ".join(src) for src, _ in edges].index(cycle[0])] += 1
    assert abs(adjacent / pairs - 2 / (n - 1)) < 0.06, adjacent / pairs  # 2/7 = 0.286; sd of the mean ~0.01
    assert chi_square_p([first_edge_position[i] for i in range(n)], [examples / n] * n) > 1e-4


def test_train_hops_are_uniform_over_one_to_max_hops():
    task = Depo(max_nodes=6, min_nodes=3, max_hops=8, alphabet=8, word_len_min=1, word_len_max=1, questions=10,
                window=12, context_len=12)
    counts = Counter(int(k) for i in range(300) for k in task.example(1, i, "train").meta["difficulty"])
    assert set(counts) == set(range(1, 9))
    assert chi_square_p([counts[k] for k in range(1, 9)], [3000 / 8] * 8) > 1e-4, counts


def test_train_node_counts_follow_the_weighted_distribution():
    """P(n = i) proportional to 1/(i + sqrt(N)) over {min_nodes..N}, by a chi-square test (3000 draws)."""
    task = Depo(max_nodes=16, min_nodes=3, max_hops=2, alphabet=16, word_len_min=1, word_len_max=1, questions=1,
                window=4, context_len=32)
    counts = Counter(task.example(4, i, "train").meta["n"] for i in range(3000))
    weights = np.array([1 / (i + 4.0) for i in range(3, 17)])
    expected = 3000 * weights / weights.sum()
    assert chi_square_p([counts[i] for i in range(3, 17)], expected) > 1e-4, counts
    # the same draws are far from uniform: the test can tell the two apart
    assert chi_square_p([counts[i] for i in range(3, 17)], [3000 / 14] * 14) < 1e-6
