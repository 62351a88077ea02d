"""The published GSM-Infinite benchmark (Zhou et al. 2025), read from local files: the rows ``GSMInfinite`` turns
into examples when ``benchmark_path`` (eval) or ``benchmark_train_path`` (train) is set.

Written from the benchmark's description (its column layout), not from its code. Nothing is downloaded: point
the option at a local copy of a dataset (``InfiniAILab/gsm_infinite_{symbolic,medium,hard}_{0,8k,16k,32k}``, one
parquet file per op count, ``data/ops_<k>-00000-of-00001.parquet``), at one file, or at a directory (every
``.parquet`` and ``.jsonl`` file under it, in sorted path order). Both formats hold the same columns:

* ``problem`` (the statements), ``question``, ``op`` (the difficulty): required;
* ``solution``: the worked solution, ending ``Answer: <answer>.`` (the answer is what follows the last
  ``Answer:`` up to the next ``.``); symbolic rows may give the answer variables as ``answer_list`` instead;
* ``template``, ``mode``, ``d`` (1 symbolic, 2 medium, 3 hard), ``length``, ``id``, ``messages``: optional; the
  loader filters on ``template`` and ``mode`` and checks ``d`` against the task's subset, and ignores the rest.

``.parquet`` needs the ``pyarrow`` package (``pip install pyarrow``); ``.jsonl`` (one JSON object per line)
needs nothing. Rows are kept in file order; ``eval_order`` interleaves the ops so that the first examples of the
test split cover every op equally, as the generator's test split does.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Sequence

SUFFIXES = (".parquet", ".jsonl")
REQUIRED = ("problem", "question", "op")
D_SUBSET = {1: "symbolic", 2: "medium", 3: "hard"}
_VARIABLE = re.compile(r"V\d+")


@dataclasses.dataclass(frozen=True)
class Row:
    """One benchmark row: the text, the answer (an int, or the sorted answer variables of a symbolic row), op,
    and where it came from (``file`` and ``row``, its 0-based position in that file)."""
    problem: str
    question: str
    solution: str
    answer: Any
    op: int
    template: str | None
    mode: str | None
    file: str
    row: int


def files(path: str | Path) -> list[Path]:
    """The benchmark files at ``path``: the file itself, or every .parquet / .jsonl file under a directory."""
    path = Path(path)
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise ValueError(f"a benchmark file must end in {' or '.join(SUFFIXES)}, got {str(path)!r}")
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not found:
            raise ValueError(f"no {' or '.join(SUFFIXES)} files under the benchmark directory {str(path)!r}")
        return found
    raise ValueError(f"benchmark path {str(path)!r} does not exist")


def read_records(path: Path) -> list[dict]:
    """The rows of one file as dicts (a .parquet through pyarrow, a .jsonl line by line)."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError(f"reading the parquet file {str(path)!r} needs the pyarrow package: "
                              f"pip install pyarrow (or convert the file to .jsonl)") from e
        return pq.read_table(path).to_pylist()
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not a JSON object ({e})") from e
    return records


def parse_answer(record: dict, subset: str, where: str) -> Any:
    """The row's answer: an int, or the sorted answer variables of a symbolic row (``answer_list`` when present,
    else the ``V<digits>`` names after the solution's last ``Answer:``)."""
    if subset == "symbolic" and record.get("answer_list") is not None:
        names = [str(n) for n in record["answer_list"]]
        if not names or not all(_VARIABLE.fullmatch(n) for n in names):
            raise ValueError(f"{where}: answer_list must be a non-empty list of V<digits> names, got {names!r}")
        return sorted(names)
    solution = record.get("solution")
    if not isinstance(solution, str) or "Answer:" not in solution:
        raise ValueError(f"{where}: no answer: the solution must end with 'Answer: <answer>.'"
                         + (" (or give answer_list)" if subset == "symbolic" else ""))
    text = solution.rsplit("Answer:", 1)[1].split(".", 1)[0].strip()
    if subset == "symbolic" and not re.fullmatch(r"-?\d+", text):  # a variable list (an integer: a "value" question)
        names = _VARIABLE.findall(text)
        if not names or _VARIABLE.sub("", text).strip(" ,"):
            raise ValueError(f"{where}: the answer must be V<digits> names, got {text!r}")
        return sorted(names)
    if not re.fullmatch(r"-?\d+", text):
        raise ValueError(f"{where}: the answer must be an integer, got {text!r}")
    return int(text)


def load(path: str | Path, subset: str, ops: Sequence[int] | None = None, template: str | None = None,
         mode: str | None = None) -> list[Row]:
    """Every row at ``path`` with op in ``ops`` (lo, hi) (None: any), the ``template`` and ``mode`` given (None:
    any), in sorted file order then file order. Raises on a missing column, a row whose ``d`` is not ``subset``'s,
    an unreadable answer, or when no row is left."""
    rows = []
    for file in files(path):
        for index, record in enumerate(read_records(file)):
            where = f"{file} row {index}"
            missing = [c for c in REQUIRED if c not in record]
            if missing:
                raise ValueError(f"{where}: missing the column(s) {missing} (a benchmark row needs {REQUIRED})")
            op = record["op"]
            if not isinstance(op, int) or isinstance(op, bool) or op < 0:
                raise ValueError(f"{where}: op must be an int >= 0, got {op!r}")
            d = record.get("d")
            if d is not None and D_SUBSET.get(d) != subset:
                raise ValueError(f"{where}: d={d!r} is the {D_SUBSET.get(d, 'unknown')!r} subset, but the task's "
                                 f"subset is {subset!r}")
            if ops is not None and not ops[0] <= op <= ops[1]:
                continue
            if (template is not None and record.get("template") != template) or \
                    (mode is not None and record.get("mode") != mode):
                continue
            rows.append(Row(str(record["problem"]), str(record["question"]), str(record.get("solution") or ""),
                            parse_answer(record, subset, where), op, record.get("template"), record.get("mode"),
                            str(file), index))
    if not rows:
        raise ValueError(f"no benchmark rows at {str(path)!r} with op in {ops or 'any'}, template "
                         f"{template or 'any'}, mode {mode or 'any'}")
    return rows


def eval_order(rows: Sequence[Row]) -> list[int]:
    """Row indices in the test split's order: ops ascending in turn (the first row of each op, then the second,
    ...; an op whose rows ran out is skipped), so any prefix covers the ops as evenly as their rows allow."""
    by_op: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        by_op.setdefault(row.op, []).append(i)
    queues = [by_op[op] for op in sorted(by_op)]
    return [queue[j] for j in range(max(map(len, queues))) for queue in queues if j < len(queue)]
