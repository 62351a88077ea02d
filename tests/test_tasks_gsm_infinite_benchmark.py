"""The published GSM-Infinite benchmark read from local files (sleepjax/tasks/gsm_infinite_benchmark.py, and
GSMInfinite's benchmark_* options): rows in the published column layout become examples with the right tokens,
loss masks, items and op groups, in .jsonl and .parquet, and the launcher evaluates on them end to end.

The fixtures (tests/fixtures/gsm_infinite_benchmark/, made by tests/fixtures/make_gsm_benchmark.py) are rows our
own generator wrote in that layout; the expectations below read only the rows' text (problem, question, the
answer after the solution's last "Answer:"), never the loader's parse."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments.configs.gsm_infinite import TASKS
from helpers.runs import MICRO
from sleepjax import schedule
from sleepjax.tasks import gsm_infinite_benchmark as bench
from sleepjax.tasks.base import check_example
from sleepjax.tasks.gsm_infinite import GSMInfinite, tokenize

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
DATA = FIXTURES / "gsm_infinite_benchmark"
MEDIUM, SYMBOLIC, PARQUET = DATA / "medium.jsonl", DATA / "symbolic.jsonl", DATA / "medium_parquet"
TOKENIZER = str(FIXTURES / "tokenizer")
TINY = dict(TASKS["tiny"], op_max=3)


def records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def answer_words(record):
    """The answer as closed-vocabulary tokens, read from the row's text alone."""
    if record.get("answer_list"):
        return [t for name in sorted(record["answer_list"]) for t in tokenize(name)]
    text = re.search(r"Answer: ([^.]*)\.$", record["solution"])[1]
    return [t for word in text.replace(",", " ").split() for t in tokenize(word)]


def words(task, ids):
    return [task.vocab[int(i)] for i in ids]


def test_fixture_is_what_the_script_writes():
    # catches: a fixture edited by hand, or one the generator no longer writes (rerun make_gsm_benchmark.py)
    sys.path.insert(0, str(FIXTURES))
    try:
        import make_gsm_benchmark as make
    finally:
        sys.path.remove(str(FIXTURES))
    assert records(MEDIUM) == json.loads(json.dumps(make.medium_rows()))
    assert records(SYMBOLIC) == json.loads(json.dumps(make.symbolic_rows()))


@pytest.mark.parametrize("layout", ["evict", "stream"])
def test_rows_become_examples(layout):
    task = GSMInfinite(**dict(TINY, benchmark_path=str(MEDIUM), layout=layout))
    rows = records(MEDIUM)
    assert len(rows) == 9
    seen = []
    for i in range(9):
        ex = task.example(0, i, "test")
        check_example(task, ex)
        row = rows[ex.meta["benchmark_row"]]
        seen.append(ex.meta["benchmark_row"])
        context = ["BOS"] + tokenize(row["problem"]) + tokenize(row["question"])  # the published order
        answer = ["Answer", ":"] + answer_words(row) + ["EOS"]
        start = task.context_len if layout == "evict" else len(context)
        toks = words(task, ex.tokens)
        assert toks[start - len(context):start] == context
        assert toks[start:start + len(answer)] == answer
        assert set(toks[:start - len(context)]) <= {"PAD"} and set(toks[start + len(answer):]) <= {"PAD"}
        # supervised: the positions predicting the answer's tokens and EOS, one item of difficulty op
        supervised = np.arange(start + 1, start + len(answer) - 1)
        assert np.array_equal(np.flatnonzero(ex.loss_mask), supervised)
        assert np.all(ex.meta["item"][supervised] == 0) and np.sum(ex.meta["item"] >= 0) == len(supervised)
        assert ex.meta["difficulty"].tolist() == [row["op"]] and ex.meta["op"] == row["op"]
        assert ex.meta["num_tokens"] == len(context) and ex.meta["answer_start"] == start
        assert ex.meta["benchmark_file"] == str(MEDIUM) and ex.meta["template"] == row["template"]
    assert sorted(seen) == list(range(9))
    # the ops in turn, each op's rows in file order
    assert seen == [0, 3, 6, 1, 4, 7, 2, 5, 8] and [rows[r]["op"] for r in seen] == [1, 2, 3] * 3


def test_eval_groups_by_op():
    task = GSMInfinite(**dict(TINY, benchmark_path=str(MEDIUM)))
    (batch,) = task.eval_set(seed=5, size=6, batch_size=6)
    assert batch["difficulty"][:, 0].tolist() == [1, 2, 3, 1, 2, 3]
    assert batch["tokens"].shape == (6, task.seq_len)
    with pytest.raises(ValueError, match="has 9 rows.*eval_size to at most 9"):
        task.eval_set(seed=0, size=10, batch_size=5)


def test_deterministic_and_train_source():
    a = GSMInfinite(**dict(TINY, benchmark_path=str(MEDIUM), benchmark_train_path=str(MEDIUM)))
    b = GSMInfinite(**dict(TINY, benchmark_path=str(MEDIUM), benchmark_train_path=str(MEDIUM)))
    for split in ("train", "test"):
        for i in range(9):
            assert np.array_equal(a.example(0, i, split).tokens, b.example(0, i, split).tokens)
    # test: the seed is ignored (the benchmark is fixed); train: a row drawn from (seed, index)
    assert np.array_equal(a.example(0, 4, "test").tokens, a.example(7, 4, "test").tokens)
    train_rows = [a.benchmark_row(s, i, "train").row for s in (0, 1) for i in range(20)]
    assert set(train_rows) <= set(range(9)) and len(set(train_rows)) > 3
    assert train_rows[:20] != train_rows[20:]
    # without benchmark_train_path the train split stays generated, the same problems as a task without options
    c = GSMInfinite(**dict(TINY, benchmark_path=str(MEDIUM)))
    plain = GSMInfinite(**TINY)
    assert c.benchmark_row(0, 0, "train") is None
    assert np.array_equal(c.example(3, 2, "train").tokens, plain.example(3, 2, "train").tokens)


def test_filters():
    def ops(**options):
        task = GSMInfinite(**dict(TINY, benchmark_path=str(MEDIUM), **options))
        return [task.benchmark_row(0, i, "test").op for i in range(len(task._eval_order))]

    assert ops(benchmark_ops=(2, 3)) == [2, 3] * 3
    assert ops(benchmark_ops=(2, 2)) == [2, 2, 2]
    rows = records(MEDIUM)
    kept = [r for r in rows if r["template"] == "sleepjax_a"]
    assert sorted(ops(benchmark_template="sleepjax_a")) == sorted(r["op"] for r in kept)
    assert len(ops(benchmark_mode="normalforward")) == 9
    with pytest.raises(ValueError, match="no benchmark rows.*forwardreverse"):
        GSMInfinite(**dict(TINY, benchmark_path=str(MEDIUM), benchmark_mode="forwardreverse"))
    with pytest.raises(ValueError, match="benchmark_ops must be"):
        GSMInfinite(**dict(TINY, benchmark_path=str(MEDIUM), benchmark_ops=(3, 2)))


def test_symbolic_rows():
    task = GSMInfinite(**dict(TASKS["tiny_symbolic"], op_max=3, benchmark_path=str(SYMBOLIC)))
    rows = records(SYMBOLIC)
    answers = []
    for i in range(len(rows)):
        ex = task.example(0, i, "test")
        check_example(task, ex)
        row = rows[ex.meta["benchmark_row"]]
        predicted = words(task, ex.tokens[np.flatnonzero(ex.loss_mask) + 1])
        assert predicted == answer_words(row) + ["EOS"]
        answers.append(ex.meta["answer"])
    assert any(isinstance(a, list) and len(a) > 1 for a in answers)  # variable lists
    assert any(isinstance(a, int) for a in answers)  # a "value" question's integer


def test_pretrained_tokenizer_counts_its_tokens():
    task = GSMInfinite(**dict(TINY, benchmark_path=str(MEDIUM), tokenizer=TOKENIZER, context_len=640))
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(TOKENIZER) / "tokenizer.json"))
    rows = records(MEDIUM)
    for i in range(9):
        ex = task.example(0, i, "test")
        check_example(task, ex)
        row = rows[ex.meta["benchmark_row"]]
        n = ex.meta["num_tokens"]
        assert n > 3 * len(tokenize(row["problem"]))  # characters, not words
        context = ex.tokens[task.context_len - n:task.context_len]
        assert tok.decode(context.tolist()).strip().endswith(row["question"])
        assert tok.decode(context.tolist()).strip().startswith(row["problem"][:20])
        answer = tok.decode(ex.tokens[np.flatnonzero(ex.loss_mask) + 1].tolist())
        assert answer.strip().startswith(re.search(r"Answer: (\d+)\.$", row["solution"])[1])


def write(tmp_path, rows, name="rows.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_words_outside_the_closed_vocabulary(tmp_path):
    row = dict(records(MEDIUM)[0], problem="The number of zebra in Savanna equals 4.",
               question="How many zebra does Savanna have?", solution="Answer: 4.")
    path = write(tmp_path, [row])
    task = GSMInfinite(**dict(TINY, benchmark_path=path))
    with pytest.raises(ValueError, match=r"row 0 of .*rows\.jsonl.*zebra.*tokenizer="):
        task.example(0, 0, "test")
    # a checkpoint's tokenizer reads any text
    ex = GSMInfinite(**dict(TINY, benchmark_path=path, tokenizer=TOKENIZER, context_len=640)).example(0, 0, "test")
    assert ex.loss_mask.any()


@pytest.mark.parametrize("change,error", [
    (dict(solution="x = 12345. Answer: 12345."), r"row 0 .*takes 8 tokens, more than the prediction window's 7"),
    (dict(problem="The number of hen in Foxmere equals 1. " * 30), r"row 0 .*context is \d+ tokens, more than the "
                                                                     r"128 the evict layout"),
    (dict(solution="no answer here"), r"row 0: no answer"),
    (dict(solution="Answer: four."), r"row 0: the answer must be an integer"),
    (dict(d=1), r"row 0: d=1 is the 'symbolic' subset, but the task's subset is 'medium'"),
    (dict(op="3"), r"row 0: op must be an int"),
])
def test_bad_rows_are_named(tmp_path, change, error):
    path = write(tmp_path, [dict(records(MEDIUM)[0], **change)])
    with pytest.raises(ValueError, match=error):
        GSMInfinite(**dict(TINY, benchmark_path=path)).example(0, 0, "test")


def test_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        GSMInfinite(**dict(TINY, benchmark_path=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match=r"no \.parquet or \.jsonl files under"):
        GSMInfinite(**dict(TINY, benchmark_path=str(tmp_path)))
    (tmp_path / "rows.csv").write_text("problem,question\n")
    with pytest.raises(ValueError, match=r"must end in \.parquet or \.jsonl"):
        GSMInfinite(**dict(TINY, benchmark_path=str(tmp_path / "rows.csv")))
    path = write(tmp_path, [{"problem": "x", "op": 1}])
    with pytest.raises(ValueError, match=r"missing the column\(s\) \['question'\]"):
        GSMInfinite(**dict(TINY, benchmark_path=path))
    with pytest.raises(ValueError, match="benchmark_path must be None or a non-empty string"):
        GSMInfinite(**dict(TINY, benchmark_path=""))


def test_parquet_without_pyarrow_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"ops_1-00000-of-00001\.parquet.*needs the pyarrow package: pip install "
                                          r"pyarrow"):
        GSMInfinite(**dict(TINY, benchmark_path=str(PARQUET)))


def test_parquet_gives_the_jsonl_examples():
    pytest.importorskip("pyarrow")
    from_parquet = GSMInfinite(**dict(TINY, benchmark_path=str(PARQUET)))  # a directory in the published layout
    from_jsonl = GSMInfinite(**dict(TINY, benchmark_path=str(MEDIUM)))
    assert len(bench.files(PARQUET)) == 3
    for i in range(9):
        a, b = from_parquet.example(0, i, "test"), from_jsonl.example(0, i, "test")
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.loss_mask, b.loss_mask)
        assert a.meta["op"] == b.meta["op"] and a.meta["answer"] == b.meta["answer"]


def test_sleep_schedule_fits_benchmark_batches():
    # catches: a stream schedule declared from fill_tokens' span while the benchmark rows' contexts are shorter
    # (their answers start in windows the fill span says never hold one)
    options = dict(TINY, layout="stream", window=32, context_len=128, fill_tokens=(64, 100))
    task = GSMInfinite(**dict(options, benchmark_path=str(MEDIUM)))
    assert GSMInfinite(**options).sleep_schedule() != task.sleep_schedule()
    test = np.stack([task.example(0, i, "test").loss_mask for i in range(9)])
    train = np.stack([task.example(0, i, "train").loss_mask for i in range(32)])
    assert not schedule.fits(GSMInfinite(**options).sleep_schedule(), test, 32)
    for mask in (test, train):
        assert schedule.fits(task.sleep_schedule(), mask, 32)


@pytest.mark.slow
def test_launcher_evaluates_on_the_benchmark(tmp_path, launcher_env):
    """experiments.gsm_infinite for a few steps, trained on generated problems and evaluated on the fixture."""
    workdir = tmp_path / "run"
    flags = [f"--config.model.{k}={v!r}" for k, v in MICRO.items()] + [
        "--config.task.op_max=3", f"--config.task.benchmark_path={MEDIUM}", "--sleep_n=2",
        "--config.train.steps=2", "--config.train.batch_size=4", "--config.train.eval_size=6",
        "--config.train.eval_batch_size=6", "--config.train.eval_every=2", "--config.train.checkpoint_every=2",
        "--config.train.warmup_steps=1", f"--workdir={workdir}"]
    proc = subprocess.run([sys.executable, "-m", "experiments.gsm_infinite", *flags], cwd=REPO,
                          env={**launcher_env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert sorted(k for k in results["final_eval"] if k.startswith("exact/")) == ["exact/op=1", "exact/op=2",
                                                                                   "exact/op=3"]
    assert results["final_eval"]["items"] == 6
    config = json.loads((workdir / "config.json").read_text())
    assert config["task_options"]["benchmark_path"] == str(MEDIUM)
