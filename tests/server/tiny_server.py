"""The tiny pipeline (``tests/pipeline.py``) built once per test session, and real `taer serve`
processes of it: the fuzzing and soak tests share one build (tens of seconds on a busy CPU)."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from pipeline import build_pipeline

from benchmarks.servers import ServerSpec, free_port, taer_spec


@functools.cache
def tiny_pipeline() -> tuple[Path, Path]:
    """(store, patterns) of the tiny pipeline; its calibration tasks are ``tasks_file()``."""
    root = Path(tempfile.mkdtemp(prefix="taer-serve-tests-"))
    atexit.register(shutil.rmtree, root, True)
    return build_pipeline(root)


def tasks_file() -> Path:
    store, _ = tiny_pipeline()
    return store.parent / "tasks" / "tasks.yaml"


def tiny_serve_spec(name: str) -> ServerSpec:
    """`taer serve` of the tiny pipeline on a free loopback port, as the other serving tests run it
    (half of the experts kept, 8 slots a layer)."""
    store, patterns = tiny_pipeline()
    spec = taer_spec(store, patterns, 0.5, free_port(), name=name)
    return replace(spec, command=[*spec.command, "--slots-per-layer", "8"])
