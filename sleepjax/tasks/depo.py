"""Depo (Physics of LMs Part 4.1): k-hop questions about a directed cycle whose edges were read, then evicted."""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from sleepjax import schedule as schedule_lib
from sleepjax.tasks.base import Example, Task, example_rng

TRAIN_N = ("weighted", "uniform")
TEST_HOPS = ("powers", "all")
SPECIALS = ("PAD", "BOS", "SEP", "ANS")
DISTINCT = ("none", "test", "all")
QUESTION_ONLY = ("hop_stage", "distinct_questions")  # options that change the questions, never the graphs


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def held_out_hops(max_hops: int, which: str = "powers") -> tuple[int, ...]:
    """The hop counts the test split cycles through: the powers of two up to K, plus K itself ("powers", the
    paper's), or every k in 1..K ("all", for small K)."""
    if which == "all":
        return tuple(range(1, max_hops + 1))
    powers = [2**i for i in range(max_hops.bit_length()) if 2**i <= max_hops]
    return tuple(powers + ([max_hops] if max_hops not in powers else []))


class Depo(Task):
    """A random single directed cycle over n distinct node words, its edges in shuffled order, then questions.

    Layout (fixed per instance; ``seq_len = context_len + question region``):

    * context region, ``context_len`` tokens = a whole number of windows, never supervised (consolidated):
      ``[BOS]`` if bos, PAD left-padding, then the n edges ``src dst [SEP]`` in shuffled order.
    * question region: ``questions`` slots of ``2 + 2 * word_len_max`` tokens (the longest question), packed
      ``window // slot`` per window so that no question crosses a window boundary; the rest of a window is PAD,
      and the last window stops after its last slot. A question ``HOP{k} <word> ANS <answer>`` starts its slot;
      shorter words leave PAD at the slot's end. The answer is the node reached by following k edges from <word>.

    Words are word_len_min..word_len_max tokens (1 or 2 in the presets), each length equally likely: inner tokens
    ``w*``, the last token ``e*`` (marks the end of a word), so a 1-token word is one ``e`` token. Vocab order: PAD, BOS, SEP, ANS, HOP1..HOP{K},
    w0..w{V-1}, e0..e{V-1}.

    Supervision: loss on the position predicting ANS (the query word's last token) and on the positions predicting
    each answer token; item j = the latter only (exact answer-word accuracy of question j); difficulty[j] = k.
    Train: n from ``train_n`` over {min_nodes..max_nodes} ("weighted": P(n=i) proportional to 1/(i + sqrt(N))),
    k ~ Uniform{1..K}, or with a hop curriculum (``hop_stage`` > 0) k ~ Uniform{1..K_i} for training example i,
    ``K_i = min(K, 1 + i // hop_stage)`` (``hop_curriculum``): the largest k grows by one every ``hop_stage``
    examples, a pure function of the example index (so of seed and step). ``distinct_questions`` ("none",
    "test": held-out examples only, "all"): no (query, k) pair repeats within an example before every pair has
    been asked (train: the questions walk a shuffled list of all pairs with k <= K_i; test: the questions of each
    k walk a shuffled list of the nodes), so no answer can be copied from an earlier identical question of the
    same example. The price: the answers of one k are then distinct, which a model can exploit by elimination
    if it is trained that way ("all"); "test" trains on independent questions and scores without copying. Test: n = N, and k cycles through ``held_out_hops(K, test_hops)`` by global question number, so every
    test k gets an equal share of a run of examples.
    """

    def __init__(self, *, max_nodes: int = 75, min_nodes: int = 3, max_hops: int = 16, alphabet: int = 50,
                 word_len_min: int = 2, word_len_max: int = 2, questions: int = 10, window: int = 75,
                 context_len: int = 300, sep: bool = False, bos: bool = False, train_n: str = "weighted",
                 test_hops: str = "powers", hop_stage: int = 0, distinct_questions: str = "none"):
        # The defaults are the paper's setting; experiments/configs/depo.py has the CPU-scale one.
        options = dict(max_nodes=max_nodes, min_nodes=min_nodes, max_hops=max_hops, alphabet=alphabet,
                       word_len_min=word_len_min, word_len_max=word_len_max, questions=questions, window=window,
                       context_len=context_len, sep=sep, bos=bos, train_n=train_n, test_hops=test_hops,
                       hop_stage=hop_stage, distinct_questions=distinct_questions)
        self._validate(options)
        self.options = options
        self.max_nodes, self.min_nodes, self.max_hops = options["max_nodes"], options["min_nodes"], options["max_hops"]
        self.alphabet, self.word_len_min, self.word_len_max = (
            options["alphabet"], options["word_len_min"], options["word_len_max"])
        self.questions, self.window, self.context_len = options["questions"], options["window"], options["context_len"]
        self.sep, self.bos, self.train_n = bool(options["sep"]), bool(options["bos"]), options["train_n"]
        self.hop_stage = int(options["hop_stage"])
        self.distinct_questions = options["distinct_questions"]

        self.name = "depo"
        self.difficulty_name = "k"
        self.vocab = (SPECIALS + tuple(f"HOP{k}" for k in range(1, self.max_hops + 1))
                      + tuple(f"w{i}" for i in range(self.alphabet)) + tuple(f"e{i}" for i in range(self.alphabet)))
        self._inner0 = self.token_id("w0")
        self._end0 = self.token_id("e0")

        self.slot_len = 2 + 2 * self.word_len_max
        slots_per_window = self.window // self.slot_len
        # start of question j's slot; questions fill windows in order, and the sequence ends with the last slot
        self.question_starts = np.array(
            [self.context_len + (j // slots_per_window) * self.window + (j % slots_per_window) * self.slot_len
             for j in range(self.questions)], dtype=np.int32)
        self.seq_len = int(self.question_starts[-1]) + self.slot_len
        self.num_items = self.questions
        self.test_hops = held_out_hops(self.max_hops, options["test_hops"])

        self._node_counts = np.arange(self.min_nodes, self.max_nodes + 1)
        weights = (1.0 / (self._node_counts + math.sqrt(self.max_nodes)) if self.train_n == "weighted"
                   else np.ones(len(self._node_counts)))
        self.train_n_probs = weights / weights.sum()
        # Options that change only which questions are asked stay out of the salt: the data of every setting
        # without them is unchanged, and the held-out graphs are the same with and without them.
        self._salt = "depo|" + "|".join(f"{k}={v}" for k, v in sorted(options.items()) if k not in QUESTION_ONLY)

    def sleep_schedule(self, window: int | None = None) -> str:
        """S for windows no question slot reaches, W for windows holding a position every example supervises
        (question j's supervised span is [start + q, start + q + a] for query and answer word lengths q and a, so
        [start + word_len_max, start + 2 * word_len_min] is supervised whatever the words), M elsewhere."""
        window = self.window if window is None else int(window)
        possible = np.zeros(self.seq_len, bool)
        certain = np.zeros(self.seq_len, bool)
        for start in self.question_starts:
            possible[start + self.word_len_min:start + 2 * self.word_len_max + 1] = True
            certain[start + self.word_len_max:start + 2 * self.word_len_min + 1] = True
        count = schedule_lib.num_windows(self.seq_len, window)
        return "".join(
            schedule_lib.WAKE if certain[w * window:(w + 1) * window].any() else
            schedule_lib.MIXED if possible[w * window:(w + 1) * window].any() else schedule_lib.SLEEP
            for w in range(count))

    @staticmethod
    def _validate(o: Mapping[str, Any]) -> None:
        def need_int(key: str, minimum: int) -> None:
            if not _is_int(o[key]) or o[key] < minimum:
                raise ValueError(f"{key} must be an int >= {minimum}, got {o[key]!r}")

        need_int("max_nodes", 2)
        need_int("min_nodes", 2)
        if o["min_nodes"] > o["max_nodes"]:
            raise ValueError(f"min_nodes must be <= max_nodes={o['max_nodes']}, got {o['min_nodes']}")
        need_int("max_hops", 1)
        need_int("alphabet", 1)
        need_int("word_len_min", 1)
        need_int("word_len_max", o["word_len_min"])
        distinct_words = sum(o["alphabet"] ** length for length in range(o["word_len_min"], o["word_len_max"] + 1))
        if distinct_words < o["max_nodes"]:
            raise ValueError(f"alphabet must give at least max_nodes={o['max_nodes']} distinct words of "
                             f"{o['word_len_min']}..{o['word_len_max']} tokens, got alphabet={o['alphabet']} "
                             f"({distinct_words} words)")
        need_int("questions", 1)
        need_int("window", 1)
        need_int("hop_stage", 0)
        if o["distinct_questions"] not in DISTINCT:
            raise ValueError(f"distinct_questions must be one of {DISTINCT}, got {o['distinct_questions']!r}")
        for key in ("sep", "bos"):
            if not isinstance(o[key], (bool, np.bool_)):
                raise ValueError(f"{key} must be a bool, got {o[key]!r}")
        if o["test_hops"] not in TEST_HOPS:
            raise ValueError(f"test_hops must be one of {TEST_HOPS}, got {o['test_hops']!r}")
        if o["train_n"] not in TRAIN_N:
            raise ValueError(f"train_n must be one of {TRAIN_N}, got {o['train_n']!r}")
        slot_len = 2 + 2 * o["word_len_max"]
        if slot_len > o["window"]:
            raise ValueError(f"window must hold one question of up to {slot_len} tokens, got {o['window']}")
        need_int("context_len", 1)
        if o["context_len"] % o["window"]:
            raise ValueError(f"context_len must be a multiple of window={o['window']}, got {o['context_len']}")
        largest_context = o["max_nodes"] * (2 * o["word_len_max"] + o["sep"]) + o["bos"]
        if largest_context > o["context_len"]:
            raise ValueError(f"context_len must hold the largest graph ({o['max_nodes']} edges"
                             f"{' + SEP' if o['sep'] else ''}{' + BOS' if o['bos'] else ''} = {largest_context} "
                             f"tokens), got {o['context_len']}")

    def hop_curriculum(self, index: int) -> int:
        """K_i: the largest k training example ``index`` may ask (``max_hops`` without a curriculum)."""
        if self.hop_stage == 0:
            return self.max_hops
        return min(self.max_hops, 1 + int(index) // self.hop_stage)

    def _distinct_pairs(self, rng: np.random.Generator, n: int, max_k: int) -> tuple[np.ndarray, np.ndarray]:
        """(queries, hops) of the questions: a walk through shuffled lists of all n * max_k (query, k) pairs."""
        pairs = np.array([(q, k) for q in range(n) for k in range(1, max_k + 1)], dtype=np.int32)
        rounds = -(-self.questions // len(pairs))
        walk = np.concatenate([pairs[rng.permutation(len(pairs))] for _ in range(rounds)])[:self.questions]
        return walk[:, 0], walk[:, 1]

    def _distinct_queries(self, rng: np.random.Generator, n: int, hops: np.ndarray) -> np.ndarray:
        """Queries for given hops: the questions of each k walk shuffled lists of the n nodes."""
        queries = np.empty(len(hops), dtype=np.int64)
        for k in np.unique(hops):
            slots = np.flatnonzero(hops == k)
            rounds = -(-len(slots) // n)
            queries[slots] = np.concatenate([rng.permutation(n) for _ in range(rounds)])[:len(slots)]
        return queries

    def _draw_words(self, rng: np.random.Generator, n: int) -> list[tuple[int, ...]]:
        """n distinct node words (tuples of token ids), each of a uniform length in word_len_min..word_len_max."""
        words: list[tuple[int, ...]] = []
        seen: set[tuple[int, ...]] = set()
        while len(words) < n:
            letters = rng.integers(0, self.alphabet, size=rng.integers(self.word_len_min, self.word_len_max + 1))
            word = tuple(int(self._inner0 + x) for x in letters[:-1]) + (int(self._end0 + letters[-1]),)
            if word not in seen:
                seen.add(word)
                words.append(word)
        return words

    def example(self, seed: int, index: int, split: str = "train") -> Example:
        rng = example_rng(seed, index, split, salt=self._salt)
        if split == "test":
            n = self.max_nodes
            hops = np.array([self.test_hops[(index * self.questions + j) % len(self.test_hops)]
                             for j in range(self.questions)], dtype=np.int32)
        else:
            n = int(rng.choice(self._node_counts, p=self.train_n_probs))
            hops = (None if self.distinct_questions == "all" else
                    rng.integers(1, self.hop_curriculum(index) + 1, size=self.questions).astype(np.int32))
        # words[i] -> words[(i + 1) % n]: the cycle order is the draw order
        words = self._draw_words(rng, n)
        sep = (self.token_id("SEP"),) if self.sep else ()
        edges = [words[i] + words[(i + 1) % n] + sep for i in rng.permutation(n)]
        context = [token for edge in edges for token in edge]

        tokens = np.full(self.seq_len, self.token_id("PAD"), dtype=np.int32)
        tokens[self.context_len - len(context):self.context_len] = context
        if self.bos:
            tokens[0] = self.token_id("BOS")
        loss_mask = np.zeros(self.seq_len, dtype=bool)
        item = np.full(self.seq_len, -1, dtype=np.int32)

        distinct = self.distinct_questions == "all" or (self.distinct_questions == "test" and split == "test")
        if not distinct:
            queries = rng.integers(0, n, size=self.questions)
        elif hops is None:
            queries, hops = self._distinct_pairs(rng, n, self.hop_curriculum(index))
        else:
            queries = self._distinct_queries(rng, n, hops)
        answers = (queries + hops) % n
        for j, start in enumerate(self.question_starts):
            query, answer = words[queries[j]], words[answers[j]]
            question = (self.token_id(f"HOP{hops[j]}"),) + query + (self.token_id("ANS"),) + answer
            tokens[start:start + len(question)] = question
            ans_pos = start + 1 + len(query)
            loss_mask[ans_pos - 1:ans_pos + len(answer)] = True  # predicts ANS, then each answer token
            item[ans_pos:ans_pos + len(answer)] = j

        meta = dict(item=item, difficulty=hops, n=n, hops=hops,
                    cycle=tuple(self.decode(w) for w in words),
                    queries=tuple(self.decode(words[q]) for q in queries),
                    answers=tuple(self.decode(words[a]) for a in answers))
        return Example(tokens=tokens, loss_mask=loss_mask, meta=meta)
