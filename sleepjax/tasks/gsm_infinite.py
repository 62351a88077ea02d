"""GSM-Infinite-style problems (Zhou et al. 2025): a clean-room generator written from method.md's description.

Three subsets, all over a closed, seed-independent vocabulary (``GSMInfinite.vocab``):

* ``symbolic``: ``assign V12 = 7.``, ``assign V34 = V12.``, ``assign V56 = V12 + 1.``, ``assign V78 = V56 - 1.``
  The needed variables form a random tree under one root constant; filler variables form a second tree whose
  root is never assigned (their values are unknown). Question first: ``question: which variables equal 7?``
  (answer: the needed-tree variables equal to 7, sorted, e.g. ``Answer: V12 V34``) or ``question: value of V56?``.
* ``medium``: places hold items (two levels). A quantity is ``the number of <item> in <place>`` or the implicit
  aggregate ``the total number of <category> in <place>`` = the sum over the items of that category whose number
  in that place is mentioned anywhere in the text (an item never mentioned for the place counts 0).
* ``hard`` adds a third level: ``the average number of <sub> per <item> in <place>`` and the aggregate
  ``the total number of <sub> in <place>`` = the sum over the category's items of average x number (a factor
  never mentioned counts 0). Each category has its own sub (fruits -> seeds, tools -> screws, ...).

Statements are ``<Quantity> equals <expression>.`` with expression one of ``<int>``, ``<Q>``, ``<int> plus <Q>``,
``<int> times <Q>``, ``the sum of <Q> and <Q>``, ``the sum of <Q>, <Q>, and <Q>`` (up to 4 terms),
``the difference between <Q> and <Q>``. Aggregates are never defined by a statement; every other quantity that
is mentioned is defined by exactly one statement, the dependencies are acyclic and every value is in 0..1000.
Questions: ``How many <item> does <place> have?`` or ``What is the total number of <category> in <place>?``
(in ``hard`` also ``... total number of <sub> ...``).

op (the difficulty) = the summed op count of the statements and aggregates needed to answer:
a constant or a copy counts 1, ``c plus Q`` / ``c times Q`` / a difference count 2, a sum of k terms counts k,
a category total over k mentioned items counts k, a sub total over k items whose average and number are both
mentioned counts 2k (k products, k additions). A quantity is needed if the question's quantity depends on it
(an aggregate depends on its terms). In ``symbolic`` every assignment counts 1: op = the needed tree's size for
"which" questions, the target's chain length (root included) for "value" questions.

Distractors: ``distractors`` statements that no needed quantity uses (always present), ``noise`` "spider"
statements defining new quantities from needed ones (true, unneeded), and with ``fill_tokens=(lo, hi)`` more of
both until the context (BOS, question, statements) is a token length drawn from that range, counted in the tokens
of the encoder in use: every problem's context is in [lo, hi] (capped at the room the layout leaves). In
``symbolic`` all three add filler-tree statements (a spider would give a known value and could change a "which"
answer).

Layout ``evict`` (default): ``[PAD..., BOS, question, statements]`` fills ``context_len`` tokens (a whole number of
windows, left-padded so the text ends at the prediction window), then the prediction window ``Answer : <answer> EOS``
right-padded to ``pred_len``; ``seq_len = context_len + pred_len``: the whole problem is consolidated and evicted
before the answer. Layout ``stream`` (the paper's): ``[BOS, question, statements, Answer : <answer> EOS, PAD...]``
from position 0, ``seq_len = context_len``: windows fill from the start of the text, so the windows before the
answer's are consolidated and the rest of the problem is still in attention when the answer is predicted; with
``fill_tokens`` its lo must be >= window, so no answer is ever supervised in the first window.
With ``tokenizer`` (a pretrained model's tokenizer.json) the text is tokenized by it instead of the closed word
vocabulary (``text_encoding.py``). The loss (and item 0) is on the positions
predicting the answer tokens and EOS; difficulty = [op]. Train draws op ~ Uniform{op_min..op_max}; the test
split cycles op by index so every op gets an equal share of a run of examples.

The published benchmark's rows (a local copy; ``gsm_infinite_benchmark.py``) replace the test split with
``benchmark_path`` and the train split with ``benchmark_train_path``, laid out and scored like generated problems
(the class docstring says how).

``sleep_schedule`` follows from the layout: the supervised positions of a problem are the span that starts where
the answer does (context_len in ``evict``; the context's length in ``stream``, in fill_tokens' range when set)
and is as long as its answer.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Mapping, Sequence

import numpy as np

from sleepjax import schedule as schedule_lib
from sleepjax.tasks import gsm_infinite_benchmark as benchmark_lib
from sleepjax.tasks.base import Example, Task, example_rng
from sleepjax.tasks.text_encoding import TokenizerEncoder, WordEncoder

SUBSETS = ("symbolic", "medium", "hard")
LAYOUTS = ("evict", "stream")
SPECIALS = ("PAD", "BOS", "EOS")
PUNCTUATION = (".", ",", "?", ":", "=", "+", "-")
DIGITS = tuple(str(d) for d in range(10))
GRAMMAR_WORDS = ("The", "the", "number", "of", "in", "average", "per", "total", "equals", "plus", "times", "sum",
                 "and", "difference", "between", "How", "many", "does", "have", "What", "is", "Answer")
SYMBOLIC_WORDS = ("assign", "question", "value", "which", "variables", "equal", "V")
PLACES = ("Ashgrove", "Brambleton", "Cobbleford", "Dunwhistle", "Emberlyn", "Foxmere", "Gladwick", "Hollowby",
          "Inkbarrow", "Jasperton", "Kettlewick", "Larkmoor", "Mossbury", "Nettlecombe", "Oakhollow", "Pebbleford")
# category (plural) -> (its sub in hard, its items); items are used in the singular everywhere
CATEGORIES: Mapping[str, tuple[str, tuple[str, ...]]] = {
    "fruits": ("seeds", ("apple", "pear", "plum", "fig", "quince", "cherry")),
    "tools": ("screws", ("hammer", "saw", "chisel", "drill", "wrench", "trowel")),
    "animals": ("spots", ("goat", "sheep", "donkey", "llama", "rabbit", "hen")),
    "vehicles": ("bolts", ("wagon", "cart", "sled", "barrow", "buggy", "raft")),
    "instruments": ("bells", ("fiddle", "drum", "flute", "harp", "lute", "horn")),
    "toys": ("beads", ("kite", "yoyo", "marble", "puppet", "spinner", "rattle")),
    "garments": ("buttons", ("hat", "scarf", "boot", "glove", "cloak", "vest")),
    "flowers": ("petals", ("rose", "tulip", "daisy", "lily", "iris", "poppy")),
}
ITEM_CATEGORY = {item: cat for cat, (_, items) in CATEGORIES.items() for item in items}
SUB_CATEGORY = {sub: cat for cat, (sub, _) in CATEGORIES.items()}
VOCAB = (SPECIALS + PUNCTUATION + DIGITS + GRAMMAR_WORDS + SYMBOLIC_WORDS + PLACES + tuple(CATEGORIES)
         + tuple(sub for sub, _ in CATEGORIES.values()) + tuple(ITEM_CATEGORY))

MAX_VALUE = 1000
MAX_ANSWER_DIGITS = len(str(MAX_VALUE))
MAX_LIST = 4            # longest "which variables" answer; trees with no value this rare are redrawn
MAX_SUM_TERMS = 4
TIMES_MAX = 5           # "c times Q" uses c in 2..TIMES_MAX
P_REUSE = 0.35          # an operand reuses an existing quantity (the graph becomes a DAG, not a tree)
P_AGGREGATE = 0.35      # an operand is a new aggregate
P_AVERAGE = 0.3         # hard: a new leaf is an average rather than a number
MAX_REDRAWS = 200
FILL_MISSES = 16        # statements one fill may fail to make or fit before it gives up (the problem is redrawn)
FILL_ROUNDS = 4         # exact measurements of a filled context (each corrects the per-statement estimate)
_TOKEN_RE = re.compile(r"[A-Za-z]+|\d|[.,?:=+\-]")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def tokenize(text: str) -> list[str]:
    """Words and punctuation as tokens, numbers digit by digit ("V123" -> V 1 2 3)."""
    tokens = _TOKEN_RE.findall(text)
    if "".join(tokens) != "".join(text.split()):
        raise ValueError(f"text has characters outside the tokenizer's alphabet: {text!r}")
    return tokens


def detokenize(tokens: Sequence[str]) -> str:
    """Inverse of ``tokenize`` on generated text: digits join digits and V, . , ? : join the word before."""
    out: list[str] = []
    for token in tokens:
        if out and (token in ".,?:" or (token.isdigit() and (out[-1][-1].isdigit() or out[-1] == "V"))):
            out[-1] += token
        else:
            out.append(token)
    return " ".join(out)


@dataclasses.dataclass
class _Node:
    """A quantity of a medium/hard problem: a leaf (defined by a statement) or an aggregate."""
    id: int
    kind: str             # "count" | "avg" (leaves) | "total" | "subtotal" (aggregates)
    place: str
    cat: str
    item: str | None
    value: int
    own_op: int
    anc: frozenset        # ids of every quantity this one's value depends on, itself included
    form: str = ""        # leaves: const | copy | plus | times | sum | diff
    const: int = 0
    args: tuple = ()      # leaves: operand ids; aggregates: term ids (subtotal: avg, count pairs)


@dataclasses.dataclass
class Problem:
    question: str
    statements: list[str]  # in text order
    answer: Any            # int, or sorted list of variable names
    answer_tokens: list[str]
    op: int
    subset: str
    solution: str
    values: dict[str, int]  # every quantity with a known value (text -> value): what the text implies

    @property
    def text(self) -> str:
        return " ".join(self.statements)


def _split(rng: np.random.Generator, total: int, parts: int, allow_zero: bool) -> list[int]:
    """A random composition of ``total`` into ``parts``; the first part >= 1, with allow_zero later parts may be
    0 (an operand already counted: the graph shares it)."""
    zeros = 0
    if allow_zero and parts > 1:
        zeros = int((rng.random(parts - 1) < 0.25).sum())
    zeros = max(zeros, parts - total)
    positive = parts - zeros
    cuts = np.sort(rng.choice(np.arange(1, total), size=positive - 1, replace=False)) if positive > 1 else []
    sizes = np.diff(np.concatenate([[0], cuts, [total]])).astype(int).tolist()
    rest = sizes[1:] + [0] * zeros
    return [sizes[0]] + [rest[i] for i in rng.permutation(len(rest))]


class _Graph:
    """The quantities of one medium/hard problem under construction.

    Invariants: a node is created after everything it depends on (ids are a topological order); an aggregate is
    registered when first used and its (place, category) is then frozen (no new leaf there), so its terms never
    change; while an aggregate's fresh terms are being built its (place, category) is busy (only those terms may
    be created there and none of its aggregates may be used)."""

    def __init__(self, task: "GSMInfinite", rng: np.random.Generator):
        self.task, self.rng = task, rng
        self.hard = task.subset == "hard"
        self.places = [str(p) for p in rng.choice(PLACES, size=task.places, replace=False)]
        self.cats = [str(c) for c in rng.choice(tuple(CATEGORIES), size=task.categories, replace=False)]
        self.items = {c: [str(i) for i in rng.choice(CATEGORIES[c][1], size=task.items, replace=False)]
                      for c in self.cats}
        self.nodes: list[_Node] = []
        self.leaf: dict[tuple[str, str, str], int] = {}       # (kind, place, item) -> id
        self.aggregate: dict[tuple[str, str, str], int] = {}  # (kind, place, cat) -> id
        self.frozen: set[tuple[str, str]] = set()
        self.busy: set[tuple[str, str]] = set()
        self.needed: frozenset = frozenset()
        self.leaf_kinds = ("count", "avg") if self.hard else ("count",)
        self.aggregate_kinds = ("total", "subtotal") if self.hard else ("total",)

    # ----- quantities and their ops
    def op_of(self, ids, counted=frozenset()) -> int:
        return sum(self.nodes[m].own_op for m in ids if m not in counted)

    def terms(self, kind: str, place: str, cat: str) -> list[int]:
        """The ids an aggregate sums: numbers (total) or flattened (average, number) pairs (subtotal)."""
        out = []
        for item in self.items[cat]:
            count = self.leaf.get(("count", place, item))
            if kind == "total" and count is not None:
                out.append(count)
            elif kind == "subtotal" and count is not None and ("avg", place, item) in self.leaf:
                out += [self.leaf[("avg", place, item)], count]
        return out

    def aggregate_value(self, kind: str, terms: list[int]) -> int:
        values = [self.nodes[t].value for t in terms]
        return sum(values) if kind == "total" else sum(a * c for a, c in zip(values[::2], values[1::2]))

    def refs(self) -> list:
        """Everything a new statement may use: leaf ids, aggregate ids, and (kind, place, cat) keys of aggregates
        not registered yet (using one registers it)."""
        out: list = [n.id for n in self.nodes if n.kind in ("count", "avg")]
        for kind in self.aggregate_kinds:
            for place in self.places:
                for cat in self.cats:
                    key = (kind, place, cat)
                    if key in self.aggregate:
                        out.append(self.aggregate[key])
                    elif (place, cat) not in self.busy and self.terms(*key) and \
                            self.aggregate_value(kind, self.terms(*key)) <= MAX_VALUE:
                        out.append(key)
        return out

    def ref_anc_op(self, ref) -> tuple[frozenset, int]:
        """(ids the ref depends on, op not yet in those ids): an unregistered aggregate has no id yet."""
        if isinstance(ref, tuple):
            terms = self.terms(*ref)
            anc = frozenset().union(*(self.nodes[t].anc for t in terms))
            return anc, len(terms)
        return self.nodes[ref].anc, 0

    def new_op(self, ref, counted) -> int:
        anc, extra = self.ref_anc_op(ref)
        return self.op_of(anc, counted) + extra

    def resolve(self, ref) -> int:
        if not isinstance(ref, tuple):
            return ref
        if ref in self.aggregate:
            return self.aggregate[ref]
        kind, place, cat = ref
        terms = self.terms(*ref)
        node_id = len(self.nodes)
        anc = frozenset().union(*(self.nodes[t].anc for t in terms)) | {node_id}
        self.nodes.append(_Node(node_id, kind, place, cat, None, self.aggregate_value(kind, terms), len(terms),
                                anc, args=tuple(terms)))
        self.aggregate[ref] = node_id
        self.frozen.add((place, cat))
        return node_id

    def free_slots(self, kind: str, allowed: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
        if allowed is not None:
            return [(p, i) for p, i in allowed if (kind, p, i) not in self.leaf]
        return [(p, i) for p in self.places for c in self.cats if (p, c) not in self.frozen | self.busy
                for i in self.items[c] if (kind, p, i) not in self.leaf]

    # ----- statements
    def expression(self, form: str, args: list[int]) -> tuple[list[int], int, int] | None:
        """(args, constant, value) for a form over operand ids, or None when no constant keeps it in range."""
        rng, values = self.rng, [self.nodes[a].value for a in args]
        const = 0
        if form == "const":
            const = int(rng.integers(1, self.task.const_max + 1))
            value = const
        elif form == "copy":
            value = values[0]
        elif form == "plus":
            high = min(self.task.const_max, MAX_VALUE - values[0])
            if high < 1:
                return None
            const = int(rng.integers(1, high + 1))
            value = const + values[0]
        elif form == "times":
            high = min(TIMES_MAX, MAX_VALUE // values[0]) if values[0] else TIMES_MAX
            if high < 2:
                return None
            const = int(rng.integers(2, high + 1))
            value = const * values[0]
        elif form == "sum":
            value = sum(values)
            if value > MAX_VALUE:
                return None
        else:  # diff: the larger operand first, so the value is never negative
            if values[0] < values[1]:
                args, values = args[::-1], values[::-1]
            value = values[0] - values[1]
        return args, const, value

    def add_leaf(self, kind: str, slot: tuple[str, str], form: str, args: list[int], const: int, value: int) -> int:
        place, item = slot
        node_id = len(self.nodes)
        anc = frozenset().union(*(self.nodes[a].anc for a in args)) | {node_id}
        own_op = {"const": 1, "copy": 1, "plus": 2, "times": 2, "diff": 2}.get(form, len(args))
        self.nodes.append(_Node(node_id, kind, place, ITEM_CATEGORY[item], item, value, own_op, anc, form, const,
                                tuple(args)))
        self.leaf[(kind, place, item)] = node_id
        return node_id

    def truncate(self, size: int) -> None:
        """Drops the nodes from id ``size`` on (no older node depends on them: ids are a topological order)."""
        for node in self.nodes[size:]:
            if node.form:
                del self.leaf[(node.kind, node.place, node.item)]
            else:
                del self.aggregate[(node.kind, node.place, node.cat)]
        del self.nodes[size:]
        self.frozen = {(place, cat) for _, place, cat in self.aggregate}  # only a registered aggregate freezes

    # ----- building toward an exact op
    def build_operand(self, budget: int, counted: frozenset, exclude: Sequence[int]) -> int | None:
        """An operand whose op not already in ``counted`` is exactly ``budget`` (0: reuse a counted one)."""
        rng = self.rng
        reuse = [r for r in self.refs() if r not in exclude and self.new_op(r, counted) == budget]
        if budget == 0 or (reuse and rng.random() < P_REUSE):
            return self.resolve(reuse[rng.integers(len(reuse))]) if reuse else None
        if rng.random() < P_AGGREGATE:
            kind = self.aggregate_kinds[rng.integers(len(self.aggregate_kinds))]
            built = self.build_aggregate(kind, budget, counted)
            if built is not None:
                return built
        kind = "avg" if self.hard and rng.random() < P_AVERAGE else "count"
        return self.build_leaf(kind, budget, counted)

    def build_leaf(self, kind: str, budget: int, counted: frozenset,
                   allowed: list[tuple[str, str]] | None = None) -> int | None:
        rng = self.rng
        forms = ["const"] if budget == 1 else ["copy"] + (["plus", "times", "diff", "sum"] if budget >= 3 else [])
        form = forms[rng.integers(len(forms))]
        if form == "const":
            budgets = []
        elif form in ("copy", "plus", "times"):
            budgets = [budget - (1 if form == "copy" else 2)]
        elif form == "diff":
            budgets = _split(rng, budget - 2, 2, allow_zero=True)
        else:
            terms = int(rng.integers(2, min(MAX_SUM_TERMS, budget - 1) + 1))
            budgets = _split(rng, budget - terms, terms, allow_zero=True)
        args: list[int] = []
        for part in budgets:
            arg = self.build_operand(part, counted, args)
            if arg is None:
                return None
            args.append(arg)
            counted = counted | self.nodes[arg].anc
        expr = self.expression(form, args)
        slots = self.free_slots(kind, allowed)
        if expr is None or not slots:
            return None
        return self.add_leaf(kind, slots[rng.integers(len(slots))], form, *expr)

    def build_aggregate(self, kind: str, budget: int, counted: frozenset) -> int | None:
        """A new aggregate (at least one fresh term) whose op not in ``counted`` is exactly ``budget``."""
        rng = self.rng
        # a fresh term costs its own op (1 per number, 2 per pair) plus >= 1 per leaf it needs
        own, leaves = (1, ("count",)) if kind == "total" else (2, ("avg", "count"))
        options = []
        for place in self.places:
            for cat in self.cats:
                if (place, cat) in self.frozen | self.busy:
                    continue
                existing = self.terms(kind, place, cat)
                anc = frozenset().union(*(self.nodes[t].anc for t in existing))
                cost = len(existing) + self.op_of(anc, counted)
                free = [i for i in self.items[cat] if all((k, place, i) not in self.leaf for k in leaves)]
                most = min(len(free), (budget - cost) // (own + len(leaves)), 3 if kind == "total" else 2)
                if most >= 1:
                    options.append((place, cat, anc, cost, free, most))
        if not options:
            return None
        place, cat, anc, cost, free, most = options[rng.integers(len(options))]
        fresh = int(rng.integers(1, most + 1))
        items = [str(i) for i in rng.choice(free, size=fresh, replace=False)]
        parts = _split(rng, budget - cost - own * fresh, fresh * len(leaves), allow_zero=False)
        self.busy.add((place, cat))
        counted = counted | anc
        try:
            for j, (item, leaf_kind) in enumerate((i, k) for i in items for k in leaves):
                built = self.build_leaf(leaf_kind, parts[j], counted, allowed=[(place, item)])
                if built is None:
                    return None
                counted = counted | self.nodes[built].anc
        finally:
            self.busy.discard((place, cat))
        if self.aggregate_value(kind, self.terms(kind, place, cat)) > MAX_VALUE:
            return None
        return self.resolve((kind, place, cat))

    def build_question(self, op: int) -> int | None:
        rng = self.rng
        kinds = ["count"] + (["total"] if op >= 2 else []) + (["subtotal"] if self.hard and op >= 4 else [])
        kind = kinds[rng.integers(len(kinds))]
        reuse = [r for r in self.refs() if self.new_op(r, frozenset()) == op
                 and (r[0] if isinstance(r, tuple) else self.nodes[r].kind) == kind]
        if reuse and rng.random() < P_REUSE:
            return self.resolve(reuse[rng.integers(len(reuse))])
        if kind == "count":
            return self.build_leaf("count", op, frozenset())
        return self.build_aggregate(kind, op, frozenset())

    # ----- statements nothing needed uses
    def add_unneeded(self, spider: bool) -> bool:
        """A spider (a new quantity from a needed one) or a distractor (from unneeded ones or a constant)."""
        rng = self.rng
        for _ in range(4):
            refs = self.refs()
            if spider:
                pool = sorted(self.needed)
                forms = ["copy", "plus", "times", "sum", "diff"]
            else:
                # unregistered aggregates are used rarely: each one freezes a (place, category)
                pool = [r for r in refs if (isinstance(r, tuple) and rng.random() < 0.1)
                        or (not isinstance(r, tuple) and r not in self.needed)]
                forms = ["const", "const"] + (["copy", "plus", "times", "sum", "diff"] if pool else [])
            form = forms[rng.integers(len(forms))]
            args = []
            if form != "const":
                args.append(self.resolve(pool[rng.integers(len(pool))]))
                if form in ("sum", "diff"):
                    others = [r for r in self.refs() if r != args[0] and (spider or r not in self.needed)]
                    if not others:
                        continue
                    args.append(self.resolve(others[rng.integers(len(others))]))
            kind = "avg" if self.hard and rng.random() < P_AVERAGE else "count"
            expr, slots = self.expression(form, args), self.free_slots(kind)
            if expr is not None and slots:
                self.add_leaf(kind, slots[rng.integers(len(slots))], form, *expr)
                return True
        return False

    # ----- rendering
    def quantity(self, node: _Node) -> str:
        sub = CATEGORIES[node.cat][0]
        return {"count": f"the number of {node.item} in {node.place}",
                "avg": f"the average number of {sub} per {node.item} in {node.place}",
                "total": f"the total number of {node.cat} in {node.place}",
                "subtotal": f"the total number of {sub} in {node.place}"}[node.kind]

    def statement(self, node: _Node) -> str:
        qs = [self.quantity(self.nodes[a]) for a in node.args]
        rhs = {"const": lambda: str(node.const), "copy": lambda: qs[0],
               "plus": lambda: f"{node.const} plus {qs[0]}", "times": lambda: f"{node.const} times {qs[0]}",
               "diff": lambda: f"the difference between {qs[0]} and {qs[1]}",
               "sum": lambda: (f"the sum of {qs[0]} and {qs[1]}" if len(qs) == 2
                               else f"the sum of {', '.join(qs[:-1])}, and {qs[-1]}")}[node.form]()
        text = f"{self.quantity(node)} equals {rhs}."
        return text[0].upper() + text[1:]

    def question(self, node: _Node) -> str:
        if node.kind == "count":
            return f"How many {node.item} does {node.place} have?"
        return f"What is {self.quantity(node)}?"

    def step(self, node: _Node) -> str:
        values = [self.nodes[a].value for a in node.args]
        if node.kind == "subtotal":
            work = " + ".join(f"{a} times {c}" for a, c in zip(values[::2], values[1::2]))
        elif node.kind == "total" or node.form == "sum":
            work = " + ".join(map(str, values)) if len(values) > 1 else ""
        else:
            work = {"plus": f"{node.const} + {values[0]}" if values else "",
                    "times": f"{node.const} times {values[0]}" if values else "",
                    "diff": f"{values[0]} - {values[1]}" if len(values) == 2 else ""}.get(node.form, "")
        return f"{self.quantity(node)} = {work + ' = ' if work else ''}{node.value}."


class GSMInfinite(Task):
    """GSM-Infinite-style problems; see the module docstring for the grammar, op and layout.

    Options: subset; op_min..op_max; distractors and noise (int or (lo, hi), drawn uniformly per problem);
    fill_tokens (0 = off, or (lo, hi): add unneeded statements until BOS + question + statements, in the
    encoder's tokens, reach a length drawn from the range, capped at the room the layout leaves; stream needs
    lo >= window); places, categories, items (the world of one problem:
    how many places, categories and items per category it draws from); const_max (constants 1..const_max);
    var_digits (digits of a symbolic variable name); window; context_len; layout ("evict" or "stream", see the
    module docstring); tokenizer (None, or the path of a tokenizer.json / checkpoint directory).

    The published benchmark (``gsm_infinite_benchmark.py``): benchmark_path (None, or a local .parquet / .jsonl
    file or a directory of them) replaces the test split by its rows, benchmark_train_path the train split;
    benchmark_ops (0 = every op, or (lo, hi)), benchmark_template and benchmark_mode (None = any) filter both.
    A row's context is BOS, problem, question (its own order), tokenized like the generated problems; its answer
    is supervised and scored as theirs, difficulty = its op. Test example i is the i-th row with the ops taken in
    turn (``eval_order``; the seed is ignored), train example i a row drawn from (seed, index). A row whose context
    or answer does not fit the layout, or (closed vocabulary) whose text has a word outside it, is an error that
    names its file and row: the closed vocabulary holds this generator's words only, so the published rows need
    ``tokenizer``. Every integer or variable-list answer is spelled in the closed vocabulary (digits, ``-``, ``V``).
    """

    def __init__(self, *, subset: str = "medium", op_min: int = 1, op_max: int = 4,
                 distractors: int | tuple[int, int] = (1, 2), noise: int | tuple[int, int] = (0, 1),
                 fill_tokens: int | tuple[int, int] = 0, places: int = 2, categories: int = 2, items: int = 3,
                 const_max: int = 9, var_digits: int = 2, window: int = 64, context_len: int = 128,
                 layout: str = "evict", tokenizer: str | None = None, benchmark_path: str | None = None,
                 benchmark_train_path: str | None = None, benchmark_ops: int | tuple[int, int] = 0,
                 benchmark_template: str | None = None, benchmark_mode: str | None = None):
        # The defaults are the CPU-scale problems; experiments/configs/gsm_infinite.py has the paper-length ones.
        options = dict(subset=subset, op_min=op_min, op_max=op_max, distractors=distractors, noise=noise,
                       fill_tokens=fill_tokens, places=places, categories=categories, items=items,
                       const_max=const_max, var_digits=var_digits, window=window, context_len=context_len,
                       layout=layout, tokenizer=None if tokenizer is None else str(tokenizer),
                       benchmark_path=None if benchmark_path is None else str(benchmark_path),
                       benchmark_train_path=None if benchmark_train_path is None else str(benchmark_train_path),
                       benchmark_ops=benchmark_ops, benchmark_template=benchmark_template,
                       benchmark_mode=benchmark_mode)
        for key in ("distractors", "noise"):
            if _is_int(options[key]):
                options[key] = (int(options[key]), int(options[key]))
        self._validate(options)
        options = {k: tuple(int(x) for x in v) if isinstance(v, (tuple, list)) else v for k, v in options.items()}
        self.options = options
        for key, value in options.items():
            setattr(self, key, value)

        self.name = "gsm_infinite"
        self.difficulty_name = "op"
        self.num_items = 1
        self._vocab_set = frozenset(VOCAB)
        self._encoder = (TokenizerEncoder(self.tokenizer) if self.tokenizer else WordEncoder(VOCAB, self.tokenize))
        self.vocab = self._encoder.vocab
        self.pred_len = self._longest_answer()
        if self.pred_len > self.window:
            raise ValueError(f"window must hold the prediction window of {self.pred_len} tokens, got {self.window}")
        self._prefix_len = len(self._encoder.answer(["0"], "0")[0])  # "Answer :" is the same for every answer
        if self.layout == "stream" and self.fill_tokens and self._fill_span()[0] < self.window:
            raise ValueError(f"context_len must leave room for a context of fill_tokens' lo={self.fill_tokens[0]} "
                             f"tokens and an answer of {self.pred_len} in the stream layout (and lo >= "
                             f"window={self.window}), got {self.context_len}")
        self.seq_len = self.context_len + (self.pred_len if self.layout == "evict" else 0)
        # The salt leaves out how problems are tokenized and laid out: without fill_tokens the problems do not
        # depend on it (with fill_tokens their length is counted in the encoder's tokens, within the layout's room),
        # and the benchmark options (the generated problems stay those of a task without them).
        self._salt = "gsm_infinite|" + "|".join(f"{k}={v}" for k, v in sorted(options.items())
                                                if k not in ("layout", "tokenizer") and not k.startswith("benchmark"))
        # split -> the benchmark rows it reads (absent: generated problems); encoded rows cached by (file, row)
        self._benchmark: dict[str, list[benchmark_lib.Row]] = {}
        filters = dict(subset=self.subset, ops=self.benchmark_ops or None, template=self.benchmark_template,
                       mode=self.benchmark_mode)
        for split, path in (("test", self.benchmark_path), ("train", self.benchmark_train_path)):
            if path is not None:
                self._benchmark[split] = benchmark_lib.load(path, **filters)
        self._eval_order = benchmark_lib.eval_order(self._benchmark["test"]) if "test" in self._benchmark else []
        self._encoded: dict[tuple[str, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    @staticmethod
    def _validate(o: Mapping[str, Any]) -> None:
        def need_int(key: str, low: int, high: int | None = None) -> None:
            if not _is_int(o[key]) or o[key] < low or (high is not None and o[key] > high):
                span = f">= {low}" if high is None else f"in {low}..{high}"
                raise ValueError(f"{key} must be an int {span}, got {o[key]!r}")

        def need_range(key: str, low: int) -> None:
            v = o[key]
            if not (isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_int(x) for x in v)
                    and low <= v[0] <= v[1]):
                raise ValueError(f"{key} must be an int >= {low} or a pair (lo, hi) of ints with "
                                 f"{low} <= lo <= hi, got {v!r}")

        if o["subset"] not in SUBSETS:
            raise ValueError(f"subset must be one of {SUBSETS}, got {o['subset']!r}")
        need_int("op_min", 1, 30)
        need_int("op_max", o["op_min"], 30)
        need_range("distractors", 0)
        need_range("noise", 0)
        need_int("places", 1, len(PLACES))
        need_int("categories", 1, len(CATEGORIES))
        need_int("items", 1, min(len(items) for _, items in CATEGORIES.values()))
        need_int("const_max", 2, 100)
        need_int("var_digits", 2, 6)
        for key in ("benchmark_path", "benchmark_train_path", "benchmark_template", "benchmark_mode"):
            if o[key] is not None and not (isinstance(o[key], str) and o[key]):
                raise ValueError(f"{key} must be None or a non-empty string, got {o[key]!r}")
        if o["benchmark_ops"] != 0:
            need_range("benchmark_ops", 0)
        if o["layout"] not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {o['layout']!r}")
        need_int("window", 1)
        need_int("context_len", o["window"])
        if o["context_len"] % o["window"]:
            raise ValueError(f"context_len must be a multiple of window={o['window']}, got {o['context_len']}")
        if o["fill_tokens"] != 0:
            need_range("fill_tokens", 1)
            if o["fill_tokens"][1] > o["context_len"]:
                raise ValueError(f"fill_tokens must be 0 or a range (lo, hi) with hi <= context_len="
                                 f"{o['context_len']}, got {o['fill_tokens']!r}")
            if o["layout"] == "stream" and o["fill_tokens"][0] < o["window"]:
                # the answer starts right after the context: lo >= window keeps it out of the first window
                raise ValueError(f"fill_tokens must start at lo >= window={o['window']} in the stream layout (no "
                                 f"answer in the first window), got {o['fill_tokens']!r}")
        list_tokens = MAX_LIST * (1 + o["var_digits"]) if o["subset"] == "symbolic" else 0
        pred_len = 2 + max(MAX_ANSWER_DIGITS, list_tokens) + 1
        if pred_len > o["window"]:
            raise ValueError(f"window must hold the prediction window of {pred_len} tokens, got {o['window']}")
        slots = o["places"] * o["categories"] * o["items"]
        if o["subset"] != "symbolic" and slots < 2:
            raise ValueError(f"places * categories * items must be >= 2 (quantities to define), got {slots}")
        if o["subset"] == "symbolic":
            # names are drawn without replacement: keep at most half of them in use
            shortest = 5 + 2 * o["var_digits"]  # assign V.. = V.. .
            most = 2 * o["op_max"] + 1 + o["distractors"][1] + o["noise"][1] + (
                o["fill_tokens"][1] // shortest if o["fill_tokens"] else 0)
            if 2 * most > 9 * 10 ** (o["var_digits"] - 1):
                raise ValueError(f"var_digits={o['var_digits']} gives too few variable names for up to {most} "
                                 f"variables; raise var_digits")

    def sleep_schedule(self, window: int | None = None) -> str:
        """S / W / M per window of ``window`` tokens (default: the task's window), from the layout alone.

        A problem whose answer starts at position ``start`` with a body (answer tokens and EOS) of B tokens is
        supervised exactly on [start + P - 1, start + P + B - 2] (P: the answer prefix's tokens). start is
        context_len in ``evict``; in ``stream`` it is the context's length: in ``_fill_span`` with fill_tokens,
        else anywhere in 1..context_len - pred_len (also with fill_tokens when a split reads benchmark rows, whose
        lengths are the file's). B is in 2..pred_len - P (at least one answer token, then EOS).
        A window is S when no such span reaches it, W when every one does, M otherwise."""
        window = self.window if window is None else int(window)
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        prefix = self._prefix_len
        if self.layout == "evict":
            start_min = start_max = self.context_len
        elif self.fill_tokens and not self._benchmark:
            start_min, start_max = self._fill_span()
        else:
            start_min, start_max = 1, self.context_len - self.pred_len
        first_min, first_max = start_min + prefix - 1, start_max + prefix - 1  # first supervised position
        last_min, last_max = start_min + prefix, start_max + self.pred_len - 2  # last supervised position
        letters = []
        for w in range(schedule_lib.num_windows(self.seq_len, window)):
            a, b = w * window, min((w + 1) * window, self.seq_len) - 1  # the window's first and last position
            if first_min > b or last_max < a:
                letters.append(schedule_lib.SLEEP)
            elif first_max <= b and last_min >= a:  # every span starts by b and ends at a or later
                letters.append(schedule_lib.WAKE)
            else:
                letters.append(schedule_lib.MIXED)
        return "".join(letters)

    # ----- text
    def tokenize(self, text: str) -> list[str]:
        tokens = tokenize(text)
        unknown = [t for t in tokens if t not in self._vocab_set]
        if unknown:
            raise ValueError(f"words outside the vocabulary: {unknown[:5]}")
        return tokens

    def detokenize(self, tokens: Sequence[str]) -> str:
        return detokenize(tokens)

    # ----- generation
    def _draw(self, rng: np.random.Generator, span: tuple[int, int]) -> int:
        return int(rng.integers(span[0], span[1] + 1))

    def _fill_span(self) -> tuple[int, int]:
        """The context lengths (lo, hi) fill_tokens allows, capped at the room the layout leaves."""
        room = self.context_len - (self.pred_len if self.layout == "stream" else 0)
        return min(self.fill_tokens[0], room), min(self.fill_tokens[1], room)

    def _fill(self, rng: np.random.Generator, question: str, statements: list[str], add, undo) -> list[str] | None:
        """``statements`` in a random order; with fill_tokens first grown until the encoded context is a length drawn
        from ``_fill_span``. ``add()`` makes one more unneeded statement (None when it cannot) and ``undo()`` takes
        back the newest one still made. None when no fill lands in the span (the caller redraws the problem).

        Lengths are estimated statement by statement (``count``) and then checked by encoding the whole context a
        few times at most: encoding it after every statement would cost one full encode per statement (hundreds
        per paper-length problem) with a BPE tokenizer."""
        if not self.fill_tokens:
            return [statements[i] for i in rng.permutation(len(statements))]
        lo, hi = self._fill_span()
        target = self._draw(rng, (lo, hi))
        made: list[tuple[str, int]] = []  # (statement, its estimated tokens) of every statement added, newest last

        def measure(texts: list[str]) -> int:
            return len(self._encoder.context(question, " ".join(texts)))

        def grow(texts: list[str], length: int, put) -> None:
            misses = 0
            while length < target and misses < FILL_MISSES:
                statement = add()
                if statement is None:
                    misses += 1
                    continue
                count = self._encoder.count(statement)
                if length + count > hi:  # never past hi: take it back and try another (constants are short)
                    undo()
                    misses += 1
                    continue
                put(texts, statement)
                made.append((statement, count))
                length += count

        grow(statements, measure(statements), list.append)
        texts = [statements[i] for i in rng.permutation(len(statements))]
        for _ in range(FILL_ROUNDS):
            length = measure(texts)
            if lo <= length <= hi:
                return texts
            # a BPE tokenizer's counts are not additive: correct from the exact length
            while length > hi and made:
                statement, count = made.pop()
                undo()
                texts.remove(statement)
                length -= count
            grow(texts, length, lambda t, s: t.insert(int(rng.integers(len(t) + 1)), s))
        return None

    def _longest_answer(self) -> int:
        """Tokens of the longest ``Answer : <answer> EOS`` this task can ask for."""
        if self.subset == "symbolic":
            names = ["V" + "9" * self.var_digits] * MAX_LIST
            tokens, text = [t for n in names for t in tokenize(n)], " ".join(names)
        else:
            tokens, text = list(str(MAX_VALUE)), str(MAX_VALUE)
        prefix, body = self._encoder.answer(tokens, text)
        return len(prefix) + len(body)

    def _encode(self, problem: "Problem") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(context ids, answer prefix ids, answer body ids: the supervised answer tokens and EOS)."""
        answer_text = " ".join(problem.answer) if isinstance(problem.answer, list) else str(problem.answer)
        return (self._encoder.context(problem.question, problem.text),
                *self._encoder.answer(problem.answer_tokens, answer_text))

    def _fits(self, problem: "Problem") -> bool:
        context, prefix, body = self._encode(problem)
        if self.layout == "evict":
            return len(context) <= self.context_len and len(prefix) + len(body) <= self.pred_len
        return len(context) + len(prefix) + len(body) <= self.context_len

    def _medium(self, rng: np.random.Generator, op: int) -> Problem | None:
        g = _Graph(self, rng)
        distractors, noise = self._draw(rng, self.distractors), self._draw(rng, self.noise)
        # some distractors come first so the core may reuse them (then they are needed; more are added below)
        for _ in range(int(rng.integers(0, distractors + 1))):
            g.add_unneeded(spider=False)
        target = None
        for _ in range(6):
            target = g.build_question(op)
            if target is not None:
                break
        if target is None:
            return None
        g.needed = g.nodes[target].anc
        assert g.op_of(g.needed) == op, (g.op_of(g.needed), op)

        def unneeded() -> int:
            return sum(1 for n in g.nodes if n.kind in ("count", "avg") and n.id not in g.needed)

        while unneeded() < distractors and g.add_unneeded(spider=False):
            pass
        for _ in range(noise):
            g.add_unneeded(spider=True)
        question = g.question(g.nodes[target])
        sizes: list[int] = []  # len(g.nodes) before each fill statement still in the graph

        def add() -> str | None:
            sizes.append(len(g.nodes))
            if g.add_unneeded(spider=bool(rng.random() < 0.5)):
                return g.statement(g.nodes[-1])
            g.truncate(sizes.pop())  # a failed try may have registered aggregates: free their slots again
            return None

        statements = self._fill(rng, question, [g.statement(n) for n in g.nodes if n.form], add,
                                lambda: g.truncate(sizes.pop()))
        if statements is None:
            return None
        solution = " ".join(g.step(g.nodes[i]) for i in sorted(g.needed))
        answer = g.nodes[target].value
        values = {g.quantity(n): n.value for n in g.nodes}
        return Problem(question, statements, answer, list(str(answer)), op, self.subset, solution, values)

    def _symbolic(self, rng: np.random.Generator, op: int) -> Problem | None:
        low, high = 10 ** (self.var_digits - 1), 10 ** self.var_digits
        used: set[int] = set()

        def new_name() -> str:
            while True:
                n = int(rng.integers(low, high))
                if n not in used:
                    used.add(n)
                    return f"V{n}"

        # a node: [name, parent index or -1, form, value or None]
        def grow(tree: list, parent: int) -> None:
            value = tree[parent][3]
            forms = ["copy", "plus"] + (["minus"] if value is None or value >= 1 else [])
            form = forms[rng.integers(len(forms))]
            if value is not None:
                value = value + {"copy": 0, "plus": 1, "minus": -1}[form]
            tree.append([new_name(), parent, form, value])

        which = bool(rng.random() < 0.5)
        needed = [[new_name(), -1, "const", int(rng.integers(0, self.const_max + 1))]]
        if which:
            for j in range(1, op):
                grow(needed, int(rng.integers(j)))
            target = -1
        else:
            for j in range(1, op):
                grow(needed, j - 1)
            target = op - 1
            for _ in range(int(rng.integers(0, op))):  # off-path branches: in the tree, not needed
                grow(needed, int(rng.integers(len(needed))))
        filler = [[new_name(), -1, "unset", None]]
        for _ in range(self._draw(rng, self.distractors) + self._draw(rng, self.noise)):
            grow(filler, int(rng.integers(len(filler))))

        def render(tree: list, j: int) -> str:
            name, parent, form, _ = tree[j]
            rhs = {"const": lambda: str(tree[j][3]), "copy": lambda: tree[parent][0],
                   "plus": lambda: f"{tree[parent][0]} + 1", "minus": lambda: f"{tree[parent][0]} - 1"}[form]()
            return f"assign {name} = {rhs}."

        if which:
            values = [node[3] for node in needed]
            rare = sorted({v for v in values if values.count(v) <= MAX_LIST})
            if not rare:
                return None
            value = rare[rng.integers(len(rare))]
            answer: Any = sorted(node[0] for node in needed if node[3] == value)
            answer_tokens = [t for name in answer for t in tokenize(name)]
            question = f"question: which variables equal {value}?"
            steps = list(range(len(needed)))
        else:
            answer = needed[target][3]
            answer_tokens = list(str(answer))
            question = f"question: value of {needed[target][0]}?"
            steps = list(range(op))  # the path root -> target

        def add() -> str:
            grow(filler, int(rng.integers(len(filler))))
            return render(filler, len(filler) - 1)

        def undo() -> None:  # the newest filler variable: nothing refers to it yet
            used.discard(int(filler.pop()[0][1:]))

        statements = self._fill(rng, question, [render(needed, j) for j in range(len(needed))]
                                + [render(filler, j) for j in range(1, len(filler))], add, undo)
        if statements is None:
            return None

        def step(j: int) -> str:
            name, parent, form, value = needed[j]
            if form == "const" or form == "copy":
                return f"{name} = {value}."
            sign = "+" if form == "plus" else "-"
            return f"{name} = {needed[parent][3]} {sign} 1 = {value}."

        solution = " ".join(step(j) for j in steps)
        values = {name: value for name, _, _, value in needed}
        return Problem(question, statements, answer, answer_tokens, op, self.subset, solution, values)

    def problem(self, seed: int, index: int, split: str = "train") -> Problem:
        """The problem behind ``example(seed, index, split)``."""
        rng = example_rng(seed, index, split, salt=self._salt)
        span = self.op_max - self.op_min + 1
        op = self.op_min + (index % span if split == "test" else int(rng.integers(span)))
        generate = self._symbolic if self.subset == "symbolic" else self._medium
        for _ in range(MAX_REDRAWS):
            problem = generate(rng, op)
            if problem is not None and self._fits(problem):
                return problem
        raise RuntimeError(f"no problem with op={op} within context_len={self.context_len} after {MAX_REDRAWS} "
                           f"draws: lower distractors/noise or op_max, raise context_len, or (medium/hard) give "
                           f"more places/categories/items ({self.options})")

    def benchmark_row(self, seed: int, index: int, split: str = "train") -> benchmark_lib.Row | None:
        """The benchmark row behind ``example(seed, index, split)``, or None when the split is generated."""
        rows = self._benchmark.get(split)
        if rows is None:
            return None
        example_rng(seed, index, split, salt="")  # the same checks of seed and index as a generated example's
        if split == "test":
            if index >= len(self._eval_order):
                raise ValueError(f"the benchmark's test split has {len(self._eval_order)} rows (benchmark_path="
                                 f"{self.benchmark_path!r} after the filters), asked for example {index}: lower "
                                 f"train.eval_size to at most {len(self._eval_order)}")
            return rows[self._eval_order[index]]
        # train: a row drawn from (seed, index) alone
        return rows[int(example_rng(seed, index, split, salt="gsm_infinite_benchmark").integers(len(rows)))]

    def _encode_row(self, row: benchmark_lib.Row) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(context ids, answer prefix ids, answer body ids) of a benchmark row: BOS, problem, question (the
        encoder puts its first text first), then the answer; raises naming the row when it does not fit."""
        where = f"benchmark row {row.row} of {row.file}"
        try:
            context = self._encoder.context(row.problem, row.question)
        except ValueError as e:  # the closed vocabulary: a word it does not hold
            raise ValueError(f"{where}: {e}; the closed vocabulary holds only this generator's words: read the "
                             f"published rows with tokenizer=<a checkpoint's tokenizer.json>") from e
        if isinstance(row.answer, list):
            tokens, text = [t for name in row.answer for t in tokenize(name)], " ".join(row.answer)
        else:
            tokens, text = list(str(row.answer)), str(row.answer)
        prefix, body = self._encoder.answer(tokens, text)
        answer_len = len(prefix) + len(body)
        if answer_len > self.pred_len:
            raise ValueError(f"{where}: the answer {text!r} takes {answer_len} tokens, more than the prediction "
                             f"window's {self.pred_len} (the longest answer of subset={self.subset!r}"
                             f"{', var_digits=' + str(self.var_digits) if self.subset == 'symbolic' else ''})")
        room = self.context_len if self.layout == "evict" else self.context_len - answer_len
        if len(context) > room:
            raise ValueError(f"{where}: its context is {len(context)} tokens, more than the {room} the "
                             f"{self.layout} layout leaves with context_len={self.context_len}: raise context_len "
                             f"or keep fewer ops (benchmark_ops)")
        return context, prefix, body

    def example(self, seed: int, index: int, split: str = "train") -> Example:
        row = self.benchmark_row(seed, index, split)
        if row is not None:
            key = (row.file, row.row)
            if key not in self._encoded:
                self._encoded[key] = self._encode_row(row)
            context, prefix, body = self._encoded[key]
            meta = dict(problem=row.problem, question=row.question, answer=row.answer, op=row.op,
                        subset=self.subset, solution=row.solution, template=row.template, mode=row.mode,
                        benchmark_file=row.file, benchmark_row=row.row)
        else:
            problem = self.problem(seed, index, split)
            context, prefix, body = self._encode(problem)
            meta = dict(problem=problem.text, question=problem.question, answer=problem.answer, op=problem.op,
                        subset=problem.subset, solution=problem.solution)
        answer = np.concatenate([prefix, body])
        tokens = np.full(self.seq_len, self._encoder.pad_id, dtype=np.int32)
        start = self.context_len if self.layout == "evict" else len(context)  # where the answer begins
        tokens[start - len(context):start] = context
        tokens[start:start + len(answer)] = answer
        loss_mask = np.zeros(self.seq_len, dtype=bool)
        item = np.full(self.seq_len, -1, dtype=np.int32)
        # position t predicts token t + 1: from the prefix's last token (predicts the first answer token) to the
        # last answer token (predicts EOS)
        supervised = slice(start + len(prefix) - 1, start + len(answer) - 1)
        loss_mask[supervised] = True
        item[supervised] = 0
        meta = dict(item=item, difficulty=np.array([meta["op"]], dtype=np.int32), **meta, num_tokens=len(context),
                    answer_start=start)
        return Example(tokens=tokens, loss_mask=loss_mask, meta=meta)

    def export_jsonl(self, path: str, seed: int, count: int, split: str = "test") -> None:
        """One JSON object per line: problem, question, answer, op, subset, solution."""
        with open(path, "w") as f:
            for index in range(count):
                p = self.problem(seed, index, split)
                f.write(json.dumps(dict(problem=p.text, question=p.question, answer=p.answer, op=p.op,
                                        subset=p.subset, solution=p.solution)) + "\n")
