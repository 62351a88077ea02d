import numpy as np
import pytest

from sleepjax import tasks
from sleepjax.tasks.base import check_example
from sleepjax.tasks.rule110 import Rule110


def reference_rule110(bits, steps, boundary):
    """Cell-by-cell Rule 110 from the rule number's bit table (written independently of the task's formula)."""
    cells = [int(b) for b in bits]
    width = len(cells)

    def cell(row, i):
        if boundary == "periodic":
            return row[i % width]
        return row[i] if 0 <= i < width else 0

    for _ in range(steps):
        cells = [(110 >> (4 * cell(cells, i - 1) + 2 * cell(cells, i) + cell(cells, i + 1))) & 1 for i in range(width)]
    return cells


def split_example(task, ex):
    """(strings[S, W], query token, labels[S]) read back from the token sequence."""
    body = task.strings * task.width
    return ex.tokens[:body].reshape(task.strings, task.width), ex.tokens[body], ex.tokens[body + 1:]


def test_reference_rule110_known_pattern():
    # a single live cell grows leftwards under Rule 110: 0001 -> 0011 -> 0111 -> 1101 (zero boundary)
    assert reference_rule110([0, 0, 0, 1], 1, "zero") == [0, 0, 1, 1]
    assert reference_rule110([0, 0, 0, 1], 2, "zero") == [0, 1, 1, 1]
    assert reference_rule110([0, 0, 0, 1], 3, "zero") == [1, 1, 0, 1]
    # on a ring the left neighbour of cell 0 is the last cell
    assert reference_rule110([1, 0, 0, 0], 1, "periodic") == [1, 0, 0, 1]
    assert reference_rule110([1, 0, 0, 0], 1, "zero") == [1, 0, 0, 0]


@pytest.mark.parametrize("boundary", ["periodic", "zero"])
@pytest.mark.parametrize("t", [0, 1, 2, 5, 13])
def test_labels_match_reference(boundary, t):
    for width in (8, 24):
        task = Rule110(width=width, strings=4, t=t, boundary=boundary)
        for split in ("train", "test"):
            for index in range(3):
                ex = task.example(7, index, split)
                check_example(task, ex)
                strings, query, labels = split_example(task, ex)
                assert task.vocab[query] == "Q"
                expected = [reference_rule110(s, t, boundary)[0] for s in strings]
                assert labels.tolist() == expected
                assert ex.meta["labels"].tolist() == expected


def test_boundaries_disagree_on_some_strings():
    # otherwise the per-boundary label checks above could not tell the boundaries apart
    task = Rule110(width=8, t=3, boundary="zero")
    strings = [s for i in range(20) for s in split_example(task, task.example(0, i))[0]]
    assert any(reference_rule110(s, 3, "zero")[0] != reference_rule110(s, 3, "periodic")[0] for s in strings)


def test_layout_mask_and_items():
    task = Rule110(width=10, strings=3, t=2)
    assert task.window == 10 and task.seq_len == 3 * 10 + 1 + 3 and task.num_items == 1
    ex = task.example(0, 0)
    supervised = np.flatnonzero(ex.loss_mask)
    # Q and l0..l{S-2}: the positions whose next tokens are the labels
    assert supervised.tolist() == [30, 31, 32]
    assert np.all(ex.meta["item"][supervised] == 0)
    assert np.all(ex.meta["item"][~ex.loss_mask] == -1)
    assert ex.meta["difficulty"].tolist() == [2]
    assert not ex.loss_mask[:30].any()  # the string windows are consolidation windows
    assert task.difficulty_name == "t"


def test_deterministic_and_index_dependent():
    task = Rule110(width=16)
    a, b = task.example(3, 5, "train"), task.example(3, 5, "train")
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.loss_mask, b.loss_mask)
    assert not np.array_equal(a.tokens, task.example(3, 6, "train").tokens)
    assert not np.array_equal(a.tokens, task.example(4, 5, "train").tokens)
    assert not np.array_equal(a.tokens, task.example(3, 5, "test").tokens)


def test_train_and_test_strings_are_disjoint():
    task = Rule110(width=8, strings=4, t=4)
    train = {tuple(s) for i in range(200) for s in split_example(task, task.example(0, i, "train"))[0]}
    test = {tuple(s) for i in range(50) for s in split_example(task, task.example(0, i, "test"))[0]}
    assert len(train) > 50 and len(test) > 5
    assert not train & test
    # roughly 1/8 of the 256 strings are test-only
    assert len(test) < 64


def test_defaults_and_registry():
    paper = Rule110()  # the paper's width and strings
    assert (paper.width, paper.strings, paper.t, paper.boundary) == (24, 4, 4, "periodic")
    assert paper.seq_len == 101 and paper.window == 24
    assert Rule110(t=32).t == 32
    task = tasks.get("rule110", width=8, strings=2)
    assert isinstance(task, Rule110) and task.seq_len == 19
    batch = task.batch(0, 0, 4)
    assert batch["tokens"].shape == (4, 19) and batch["difficulty"].shape == (4, 1)


def test_decode_is_readable():
    task = Rule110(width=4, strings=2, t=1)
    text = task.decode(task.example(0, 0).tokens)
    words = text.split()
    assert len(words) == task.seq_len and words[8] == "Q"
    assert set(words) <= {"0", "1", "Q"}


@pytest.mark.parametrize("options, name", [
    (dict(width=2), "width"),
    (dict(width=8.0), "width"),
    (dict(width=True), "width"),
    (dict(strings=0), "strings"),
    (dict(width=4, strings=4), "strings"),
    (dict(t=-1), "t"),
    (dict(t="4"), "t"),
    (dict(boundary="wrap"), "boundary"),
])
def test_bad_options(options, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        Rule110(**options)
