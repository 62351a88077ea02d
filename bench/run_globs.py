"""Run directories named on a bench script's command line: comma-separated globs, each optionally NAME=GLOB."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Iterator


def labelled_runs(patterns: list[str]) -> Iterator[tuple[str, Path]]:
    """(NAME or "", run directory) for every directory each GLOB matches, in sorted order."""
    for pattern in patterns:
        name, _, pattern = pattern.rpartition("=")
        for run in sorted(glob.glob(pattern)):
            yield name, Path(run)
