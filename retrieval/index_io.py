"""An index directory on disk: the FAISS file beside a JSON file of labels, texts and provenance."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import faiss

from expert_store.errors import RetrievalIndexError

FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
METADATA_FILE = "index.json"
REQUIRED_KEYS = frozenset(
    {"kind", "size", "encoder", "created", "rule", "settings", "tasks", "labels", "texts"}
)


def write_index_files(directory: Path, index: faiss.Index, metadata: dict[str, Any]) -> None:
    """Write both files into ``directory`` (created if missing), each replacing the old one at once."""
    directory.mkdir(parents=True, exist_ok=True)
    # Write beside, then rename, so that a crash never leaves a half-written file behind.
    faiss.write_index(index, str(directory / f"{INDEX_FILE}.tmp"))
    (directory / f"{METADATA_FILE}.tmp").write_text(json.dumps(metadata, ensure_ascii=False))
    os.replace(directory / f"{INDEX_FILE}.tmp", directory / INDEX_FILE)
    os.replace(directory / f"{METADATA_FILE}.tmp", directory / METADATA_FILE)


def read_faiss_index(directory: Path) -> faiss.Index:
    try:
        return faiss.read_index(str(directory / INDEX_FILE))
    except RuntimeError as error:
        raise RetrievalIndexError(f"cannot read {directory / INDEX_FILE}: {error}") from error


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
    if version != FORMAT_VERSION:
        raise RetrievalIndexError(
            f"index {directory} has format version {version}, this taer reads {FORMAT_VERSION}; "
            "rebuild it with `taer index`"
        )
    missing = REQUIRED_KEYS - set(metadata)
    if missing:
        raise RetrievalIndexError(
            f"{directory / METADATA_FILE} lacks {sorted(missing)}; rebuild it with `taer index`"
        )
    return metadata
