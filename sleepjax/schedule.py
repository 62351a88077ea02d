"""Sleep schedules: which windows of a batch sleep, known before the step is compiled.

Algorithm 1 decides per example: an example's window sleeps (N passes) iff none of its own positions is
supervised. A *schedule* is a string with one letter per window of a batch that tells the compiled step how much
of that decision is fixed:

* ``S`` (sleep): no example is supervised in this window; every example runs N passes.
* ``W`` (wake): every example is supervised in this window; every example runs one pass.
* ``M`` (mixed): decided per example inside the step from its own loss mask: the batch runs N passes and an
  example that wakes keeps its first pass's hidden states and fast weights (the later passes leave it untouched).

``S`` and ``W`` windows are compiled with exactly the passes they need and no data-dependent branch; ``M`` costs N
passes for the whole batch but is right for any batch. Every schedule gives the same outputs for a batch it fits
(``fits``); only the cost differs. Tasks whose layout fixes the supervised windows declare their schedule
(``Task.sleep_schedule``); the trainer checks every batch against it on the host and runs a batch that does not
fit with ``M`` in the offending windows (``fit``), so a wrong declaration costs a recompile, never a wrong result.
"""

from __future__ import annotations

import numpy as np

SLEEP, WAKE, MIXED = "S", "W", "M"
KINDS = (SLEEP, WAKE, MIXED)


def num_windows(seq_len: int, window: int) -> int:
    return -(-int(seq_len) // int(window))


def _supervised_windows(loss_mask, window: int) -> np.ndarray:
    """bool [B, W]: example b has a supervised position in window w (host arrays only)."""
    mask = np.asarray(loss_mask, bool)
    if mask.ndim != 2:
        raise ValueError(f"loss_mask must have rank 2 [B, T], got shape {mask.shape}")
    count = num_windows(mask.shape[1], window)
    mask = np.pad(mask, ((0, 0), (0, count * window - mask.shape[1])))
    return mask.reshape(mask.shape[0], count, window).any(axis=2)


def derive(loss_mask, window: int) -> str:
    """The tightest schedule of one batch (host loss_mask [B, T]): S where no example is supervised, W where every
    example is, M elsewhere."""
    supervised = _supervised_windows(loss_mask, window)
    return "".join(WAKE if col.all() else SLEEP if not col.any() else MIXED for col in supervised.T)


def mixed(seq_len: int, window: int) -> str:
    """The schedule that fits any batch: every window decided per example."""
    return MIXED * num_windows(seq_len, window)


def check(schedule, seq_len: int, window: int) -> str:
    """``schedule`` validated against a sequence of ``seq_len`` tokens in windows of ``window``."""
    expected = num_windows(seq_len, window)
    if not isinstance(schedule, str) or len(schedule) != expected or any(c not in KINDS for c in schedule):
        raise ValueError(f"schedule must be a string of {expected} letters from {''.join(KINDS)} (one per window of "
                         f"{window} tokens in a sequence of {seq_len}), got {schedule!r}")
    return schedule


def misfits(schedule: str, loss_mask, window: int) -> list[tuple[int, str]]:
    """The windows where ``schedule`` does not fit the batch: (window, why) pairs; empty when it fits."""
    supervised = _supervised_windows(loss_mask, window)
    out = []
    for w, (kind, col) in enumerate(zip(schedule, supervised.T)):
        if kind == SLEEP and col.any():
            out.append((w, f"window {w} is declared S (sleep) but example {int(np.argmax(col))} is supervised in it"))
        elif kind == WAKE and not col.all():
            out.append((w, f"window {w} is declared W (wake) but example {int(np.argmin(col))} is not supervised "
                           f"in it (it must sleep)"))
    return out


def fits(schedule: str, loss_mask, window: int) -> bool:
    return not misfits(schedule, loss_mask, window)


def fit(declared: str, loss_mask, window: int) -> str:
    """``declared`` with M in every window where it does not fit this batch (host loss_mask)."""
    bad = {w for w, _ in misfits(declared, loss_mask, window)}
    return "".join(MIXED if w in bad else kind for w, kind in enumerate(declared))


def widen(*schedules: str) -> str:
    """One schedule that fits every batch any of ``schedules`` fits (letters that disagree become M)."""
    if len({len(s) for s in schedules}) != 1:
        raise ValueError(f"schedules must have the same length, got {schedules}")
    return "".join(col[0] if len(set(col)) == 1 else MIXED for col in zip(*schedules))
