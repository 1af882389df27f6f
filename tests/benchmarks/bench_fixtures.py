"""The labelled tiny pipeline, built once per test session for the benchmark smoke tests."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from labelled_pipeline import build_labelled_pipeline


@dataclass(frozen=True)
class TinyBench:
    root: Path
    store: Path
    patterns: Path
    tasks: Path

    @property
    def checkpoint(self) -> Path:
        return self.root / "ckpt"


@functools.cache
def tiny_bench() -> TinyBench:
    """Built on first use (tens of seconds on a busy CPU), shared by every benchmark test module."""
    root = Path(tempfile.mkdtemp(prefix="taer-bench-tests-"))
    atexit.register(shutil.rmtree, root, True)
    store, patterns, tasks = build_labelled_pipeline(root)
    return TinyBench(root, store, patterns, tasks)
