"""An index directory on disk: the FAISS file(s) and the task projection beside a JSON file of labels,
texts and provenance. Format 1 (no task space) is still read."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import faiss

from expert_store.errors import RetrievalIndexError
from retrieval.projection import PROJECTION_FILE, TaskProjection

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
INDEX_FILE = "index.faiss"
TASK_SPACE_FILE = "task_space.faiss"
METADATA_FILE = "index.json"
REQUIRED_KEYS = frozenset(
    {"kind", "size", "encoder", "created", "rule", "settings", "tasks", "labels", "texts"}
)


def write_index_files(
    directory: Path,
    index: faiss.Index,
    metadata: dict[str, Any],
    task_space: tuple[TaskProjection, faiss.Index] | None = None,
) -> None:
    """Write the files into ``directory`` (created if missing), each replacing the old one at once.

    Everything is written beside its final name first and renamed after, the metadata last, so that
    a crash never leaves a half-written file; a task space left from an earlier save is removed.
    """
    directory.mkdir(parents=True, exist_ok=True)
    written = {INDEX_FILE: directory / f"{INDEX_FILE}.tmp"}
    faiss.write_index(index, str(written[INDEX_FILE]))
    if task_space is not None:
        projection, space_index = task_space
        written[TASK_SPACE_FILE] = directory / f"{TASK_SPACE_FILE}.tmp"
        faiss.write_index(space_index, str(written[TASK_SPACE_FILE]))
        written[PROJECTION_FILE] = directory / f"{PROJECTION_FILE}.tmp"
        projection.save(written[PROJECTION_FILE])
    written[METADATA_FILE] = directory / f"{METADATA_FILE}.tmp"
    written[METADATA_FILE].write_text(json.dumps(metadata, ensure_ascii=False))
    if task_space is None:
        for stale in (TASK_SPACE_FILE, PROJECTION_FILE):
            (directory / stale).unlink(missing_ok=True)
    for name, path in written.items():
        os.replace(path, directory / name)


def read_faiss_index(directory: Path, name: str = INDEX_FILE) -> faiss.Index:
    try:
        return faiss.read_index(str(directory / name))
    except RuntimeError as error:
        raise RetrievalIndexError(
            f"cannot read {directory / name}: {error}; rebuild it with `taer index`"
        ) from error


def read_metadata(directory: Path) -> dict[str, Any]:
    """The JSON metadata, checked for presence of both files, format version and required keys."""
    for name in (INDEX_FILE, METADATA_FILE):
        if not (directory / name).is_file():
            raise RetrievalIndexError(
                f"no task index at {directory}: {name} is missing; build one with `taer index`"
            )
    try:
        metadata = json.loads((directory / METADATA_FILE).read_text())
    except (OSError, ValueError) as error:
        raise RetrievalIndexError(f"cannot read {directory / METADATA_FILE}: {error}") from error
    version = metadata.get("format_version") if isinstance(metadata, dict) else None
    if version not in READABLE_VERSIONS:
        raise RetrievalIndexError(
            f"index {directory} has format version {version}, this taer reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}; "
            "rebuild it with `taer index`"
        )
    missing = REQUIRED_KEYS - set(metadata)
    if missing:
        raise RetrievalIndexError(
            f"{directory / METADATA_FILE} lacks {sorted(missing)}; rebuild it with `taer index`"
        )
    return metadata
