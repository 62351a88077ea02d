"""Rule 110: after reading random strings (one per window), predict bit 0 of each after t automaton steps."""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

import numpy as np

from sleepjax.tasks.base import Example, Task, example_rng

BOUNDARIES = ("periodic", "zero")
# A string is test-only iff the first byte of its hash is below this: 32/256 = 1/8 of the hash space.
_TEST_HASH_BELOW = 32
# Up to this width the string space is small enough to check (by enumeration) that both splits are non-empty;
# above it an empty split has probability below (7/8)**8192.
_ENUMERATE_MAX_WIDTH = 12


def rule110_step(cells: np.ndarray, boundary: str) -> np.ndarray:
    """One synchronous Rule 110 step of bool ``cells[..., W]`` (the last axis is the row of cells).

    ``boundary``: "periodic" (the row is a ring) or "zero" (cells outside the row are dead)."""
    if boundary == "periodic":
        left, right = np.roll(cells, 1, axis=-1), np.roll(cells, -1, axis=-1)
    else:
        dead = np.zeros_like(cells[..., :1])
        left = np.concatenate([dead, cells[..., :-1]], axis=-1)
        right = np.concatenate([cells[..., 1:], dead], axis=-1)
    # Rule 110's table (111->0 110->1 101->1 100->0 011->1 010->1 001->1 000->0) in boolean form:
    # the cell is alive when its centre or right neighbour is, except when all three are.
    return (cells | right) & ~(left & cells & right)


def is_test_only(bits: np.ndarray) -> bool:
    """Whether the 0/1 string ``bits[W]`` belongs to the test split (stable across runs, machines and options)."""
    digest = hashlib.blake2b(np.asarray(bits, dtype=np.uint8).tobytes(), digest_size=8).digest()
    return digest[0] < _TEST_HASH_BELOW


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


class Rule110(Task):
    """``strings`` random binary strings of ``width`` bits, one per window (window = width), then a short
    prediction window ``Q l0 ... l{strings-1}``: label i is bit 0 (the leftmost cell) of string i after ``t``
    Rule 110 steps with the given boundary.

    Layout (seq_len = strings * width + 1 + strings): tokens are the ids of "0"/"1" for the bits, then Q, then
    the labels. loss_mask (and item 0) is on Q and l0..l{strings-2}, i.e. the positions predicting l0..l{strings-1};
    one item per example (exact accuracy = all labels right), difficulty = [t]. The string windows are
    consolidation windows.

    Held-out hygiene: a small model memorises strings at small widths, so the string space is split by hash.
    A string is test-only iff the blake2b hash of its bits falls in 1/8 of the hash space (``is_test_only``);
    train examples redraw any test-only string and test examples draw until they get test-only strings
    (rejection sampling), so no string appears in both splits. The split depends on the bits only (not on t or
    boundary), so the same strings are held out across a sweep over t.
    """

    def __init__(self, *, width: int = 24, strings: int = 4, t: int = 4, boundary: str = "periodic"):
        self.options = dict(width=width, strings=strings, t=t, boundary=boundary)

        if not _is_int(width) or width < 3:
            raise ValueError(f"width must be an int >= 3, got {width!r}")
        if not _is_int(strings) or strings < 1:
            raise ValueError(f"strings must be an int >= 1, got {strings!r}")
        if strings + 1 > width:
            # the prediction window Q l0 .. must fit in one window
            raise ValueError(f"strings must be <= width - 1 = {width - 1} so that Q and the labels fit in one "
                             f"window, got {strings}")
        if not _is_int(t) or t < 0:
            raise ValueError(f"t must be an int >= 0, got {t!r}")
        if boundary not in BOUNDARIES:
            raise ValueError(f"boundary must be one of {BOUNDARIES}, got {boundary!r}")
        if width <= _ENUMERATE_MAX_WIDTH:
            test_count = sum(is_test_only(np.array(b, np.uint8)) for b in itertools.product((0, 1), repeat=width))
            if not 0 < test_count < 2**width:
                raise ValueError(f"width={width} leaves one split with no strings ({test_count} of {2**width} "
                                 f"are test-only); use a larger width")

        self.width, self.strings, self.t, self.boundary = int(width), int(strings), int(t), boundary
        self.name = "rule110"
        self.fixed_loss_mask = True  # the labels sit at the same positions in every example
        self.vocab = ("0", "1", "Q", "PAD")  # PAD is unused; kept so the vocab is stable
        self.window = self.width
        self.seq_len = self.strings * self.width + 1 + self.strings
        self.num_items = 1
        self.difficulty_name = "t"
        self._salt = f"rule110|width={self.width}|strings={self.strings}|t={self.t}|boundary={self.boundary}"

    def _draw_string(self, rng: np.random.Generator, split: str) -> np.ndarray:
        """uint8[width] bits of a string from ``split``'s part of the string space."""
        want_test_only = split == "test"
        while True:
            bits = rng.integers(0, 2, size=self.width, dtype=np.uint8)
            if is_test_only(bits) == want_test_only:
                return bits

    def labels(self, strings: np.ndarray) -> np.ndarray:
        """Bit 0 of each row of ``strings[S, width]`` (0/1) after t steps: int32[S]."""
        cells = strings.astype(bool)
        for _ in range(self.t):
            cells = rule110_step(cells, self.boundary)
        return cells[:, 0].astype(np.int32)

    def example(self, seed: int, index: int, split: str = "train") -> Example:
        rng = example_rng(seed, index, split, salt=self._salt)
        strings = np.stack([self._draw_string(rng, split) for _ in range(self.strings)])
        labels = self.labels(strings)
        query_pos = self.strings * self.width
        # the bit values are their own token ids ("0" -> 0, "1" -> 1)
        tokens = np.concatenate([strings.reshape(-1), [self.token_id("Q")], labels]).astype(np.int32)
        loss_mask = np.zeros(self.seq_len, dtype=bool)
        loss_mask[query_pos:query_pos + self.strings] = True
        item = np.where(loss_mask, 0, -1).astype(np.int32)
        meta = dict(item=item, difficulty=np.array([self.t], dtype=np.int32), labels=labels, strings=strings)
        return Example(tokens=tokens, loss_mask=loss_mask, meta=meta)
