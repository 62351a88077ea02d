"""The task interface shared by Rule 110, Depo and GSM-Infinite.

Conventions every task follows (the model and the trainer rely on them):

* ``tokens[t]`` is an int32 id into ``task.vocab``; every example of a task has the same length ``seq_len``
  and the same window layout, so batches stack and windows line up.
* ``loss_mask[t]`` is True when the prediction made AT position t (of ``tokens[t + 1]``) is in the loss.
  The last position never is. A window whose mask is all False in every example is a consolidation window.
* ``item[t]`` groups supervised positions into scored items (one question, one answer): ``item[t] = j`` for
  the positions whose predictions together make item j's answer, -1 elsewhere. Exact accuracy of item j = every
  one of its positions predicted right (greedy decoding under teacher forcing).
* ``difficulty[j]`` is item j's difficulty (t for Rule 110, hops k for Depo, op count for GSM-Infinite);
  unused item slots hold -1. Every example of a task has the same number of item slots.
* Every example is a pure function of (seed, index, split): same arguments, same example, on any machine.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import hashlib
from typing import Any, Mapping, Sequence

import numpy as np

from sleepjax import schedule as schedule_lib

SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class Example:
    """One sequence. tokens int32[T], loss_mask bool[T]; meta holds ``item`` int32[T], ``difficulty``
    int32[Q] and any task-specific extras (extras need not be arrays; they are not stacked into batches)."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    meta: Mapping[str, Any]


def example_rng(seed: int, index: int, split: str, salt: str) -> np.random.Generator:
    """A generator that depends only on (seed, index, split, salt): deterministic across runs and machines."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(seed, (int, np.integer)) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"seed and index must be integers (index >= 0), got seed={seed!r} index={index!r}")
    digest = hashlib.blake2b(f"{salt}|{split}|{int(seed)}|{int(index)}".encode(), digest_size=16).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest, "little")))


@functools.lru_cache(maxsize=4)  # a batch spans one or two epochs; the prefetcher builds the next batch meanwhile
def epoch_order(seed: int, epoch: int, train_examples: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits a fixed set of ``train_examples`` examples (indices
    ``0 .. train_examples - 1``): a permutation that depends only on (seed, epoch, train_examples). Read-only."""
    if not isinstance(train_examples, (int, np.integer)) or train_examples < 1:
        raise ValueError(f"train_examples must be an int >= 1, got {train_examples!r}")
    order = example_rng(seed, epoch, "train", salt=f"epoch_order|{int(train_examples)}").permutation(
        int(train_examples))
    order.setflags(write=False)
    return order


def batch_indices(seed: int, step: int, batch_size: int, train_examples: int = 0) -> np.ndarray:
    """The example indices of the batch of ``step`` (int64[batch_size]), a pure function of its arguments.

    ``train_examples`` 0: an endless stream, examples ``step * batch_size .. step * batch_size + batch_size - 1``.
    ``train_examples`` K > 0: a fixed set, examples ``0 .. K - 1``, visited once per epoch in ``epoch_order(seed,
    epoch, K)``; the batch of ``step`` is positions ``step * batch_size ..`` of the concatenation of epoch 0's
    order, epoch 1's, ... (an epoch may end inside a batch: its last examples and the next epoch's first share it).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not isinstance(train_examples, (int, np.integer)) or isinstance(train_examples, bool) or train_examples < 0:
        raise ValueError(f"train_examples must be an int >= 0, got {train_examples!r}")
    positions = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
    if not train_examples:
        return positions
    epochs, within = np.divmod(positions, train_examples)
    indices = np.empty_like(positions)
    for epoch in np.unique(epochs):
        here = epochs == epoch
        indices[here] = epoch_order(seed, int(epoch), int(train_examples))[within[here]]
    return indices


class Task(abc.ABC):
    """A generator of fixed-layout examples. Subclasses set ``name``, ``vocab``, ``window``, ``seq_len``,
    ``num_items`` in ``__init__`` and implement ``example``."""

    name: str
    vocab: tuple[str, ...]
    window: int
    seq_len: int
    num_items: int
    difficulty_name: str = "difficulty"
    # True when every example (any seed, index, split) has the same loss_mask: the sleep schedule of any window
    # size then follows from one example (``sleep_schedule``).
    fixed_loss_mask: bool = False

    @abc.abstractmethod
    def example(self, seed: int, index: int, split: str = "train") -> Example:
        """The example number ``index`` of the stream ``(seed, split)``."""

    def sleep_schedule(self, window: int | None = None) -> str:
        """What this task guarantees about its windows of ``window`` tokens (default: the task's own window), one
        letter per window (``sleepjax/schedule.py``): S = no example is ever supervised there, W = every example
        always is, M = it depends on the example. The trainer compiles S and W windows without per-example masks.
        A task with a fixed loss mask derives it from one example; otherwise every window is M unless the task
        overrides this with what its layout guarantees."""
        window = self.window if window is None else int(window)
        if self.fixed_loss_mask:
            return schedule_lib.derive(self.example(0, 0, "train").loss_mask[None], window)
        return schedule_lib.mixed(self.seq_len, window)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def token_id(self, token: str) -> int:
        try:
            return self._ids[token]
        except AttributeError:
            self._ids = {t: i for i, t in enumerate(self.vocab)}
            return self._ids[token]

    def encode(self, words: Sequence[str]) -> np.ndarray:
        return np.asarray([self.token_id(w) for w in words], dtype=np.int32)

    def decode(self, tokens: Sequence[int]) -> str:
        """Readable text of a token sequence (space-separated vocab strings)."""
        return " ".join(self.vocab[int(t)] for t in tokens)

    def batch(self, seed: int, step: int, batch_size: int, split: str = "train",
              rows: slice | None = None, train_examples: int = 0) -> dict[str, np.ndarray]:
        """Examples ``batch_indices(seed, step, batch_size, train_examples)[rows]`` of the stream ``(seed, split)``,
        stacked: with ``train_examples`` 0 (an endless stream) examples ``step * batch_size + i`` for i in
        ``range(batch_size)[rows]``; with K > 0 the fixed set of its first K examples, shuffled anew each epoch.

        ``rows`` lets each host of a multi-host run build only its slice of the global batch; the rows are
        the same whichever process builds them. Returns tokens int32[B,T], loss_mask bool[B,T],
        item int32[B,T], difficulty int32[B,Q].
        """
        indices = batch_indices(seed, step, batch_size, train_examples)[rows or slice(None)]
        return stack([self.example(seed, int(i), split) for i in indices])

    def eval_set(self, seed: int, size: int, batch_size: int) -> list[dict[str, np.ndarray]]:
        """A fixed held-out set: the first ``size`` test-split examples of ``seed``, in batches."""
        batches = []
        for start in range(0, size, batch_size):
            stop = min(size, start + batch_size)
            batches.append(stack([self.example(seed, i, "test") for i in range(start, stop)]))
        return batches


def stack(examples: Sequence[Example]) -> dict[str, np.ndarray]:
    return {
        "tokens": np.stack([e.tokens for e in examples]).astype(np.int32),
        "loss_mask": np.stack([e.loss_mask for e in examples]).astype(bool),
        "item": np.stack([e.meta["item"] for e in examples]).astype(np.int32),
        "difficulty": np.stack([e.meta["difficulty"] for e in examples]).astype(np.int32),
    }


def check_example(task: Task, ex: Example) -> None:
    """Asserts the layout conventions above (used by the tests of every task)."""
    T = task.seq_len
    assert ex.tokens.shape == (T,) and ex.tokens.dtype == np.int32, (ex.tokens.shape, ex.tokens.dtype)
    assert ex.loss_mask.shape == (T,) and ex.loss_mask.dtype == bool
    assert not ex.loss_mask[-1], "the last position has no next token to predict"
    assert ex.tokens.min() >= 0 and ex.tokens.max() < task.vocab_size
    item, diff = ex.meta["item"], ex.meta["difficulty"]
    assert item.shape == (T,) and diff.shape == (task.num_items,)
    assert np.all(ex.loss_mask[item >= 0]), "every scored position must be in the loss"
    for j in np.unique(item[item >= 0]):
        assert diff[j] >= 0, "a used item slot needs a difficulty"
