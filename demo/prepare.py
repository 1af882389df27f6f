"""The demo, ready to serve: build it (cached), shard it, calibrate it and index it.

The one function that `taer quickstart` (what `make run` calls), `taer demo prepare` (what the
container runs when no model is mounted) and the benchmarks call. Each step is skipped when its
output is already there and up to date.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from demo.build import Buildable, build_demo
from expert_store.errors import PatternError, StoreError
from expert_store.manifest import MANIFEST_FILE
from expert_store.shard import shard_checkpoint
from retrieval.build import INDEX_SUBDIR, build_index_for_tasks
from retrieval.calibrate import calibrate, load_patterns_for_store
from retrieval.index_io import FORMAT_VERSION, METADATA_FILE

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DemoPaths:
    """Where the demo build, its store and its patterns go."""

    demo: Path
    store: Path
    patterns: Path

    @classmethod
    def under(cls, data: Path) -> DemoPaths:
        """The layout `taer quickstart` and the benchmarks use: ``data/{demo,store,patterns}``."""
        data = Path(data)
        return cls(data / "demo", data / "store", data / "patterns")


@dataclass(frozen=True, slots=True)
class PreparedDemo:
    """A demo ready to serve: its store and patterns (index included), and what they came from."""

    store: Path
    patterns: Path
    model_dir: Path
    tasks_file: Path


def prepare_demo(
    paths: DemoPaths, encoder_path: Path | None = None, spec: Buildable | None = None
) -> PreparedDemo:
    """Build, shard, calibrate and index the demo into ``paths``, rebuilding only what is stale.

    ``encoder_path``: the sentence-transformers model the index embeds with (default: the shipped one).
    ``spec``: the build (default: the default demo's; e.g. ``demo.deepseek_build.DeepseekBuildSpec``).
    """
    demo = build_demo(paths.demo, spec=spec)
    store, patterns = paths.store, paths.patterns
    manifest = store / MANIFEST_FILE
    if not manifest.exists() or manifest.stat().st_mtime < (demo.path / "build.json").stat().st_mtime:
        logger.info("sharding %s -> %s", demo.model_dir, store)
        shard_checkpoint(demo.model_dir, store, force=True)
    try:
        load_patterns_for_store(patterns, store)
        calibrated = True
    except (PatternError, StoreError):
        calibrated = False
    if not calibrated:
        logger.info("calibrating %s with %s", store, demo.tasks_file)
        calibrate(store, demo.tasks_file, patterns)
    if not calibrated or not index_is_current(patterns / INDEX_SUBDIR):
        logger.info("indexing %s", demo.tasks_file)
        build_index_for_tasks(demo.tasks_file, patterns, encoder_path=encoder_path)
    return PreparedDemo(store, patterns, demo.model_dir, demo.tasks_file)


def index_is_current(directory: Path) -> bool:
    """An index of this taer's format is there (an older one lacks what a rebuild would add)."""
    try:
        metadata = json.loads((directory / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(metadata, dict) and metadata.get("format_version") == FORMAT_VERSION
