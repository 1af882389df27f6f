"""The retrieval index that `taer calibrate` writes beside the patterns (``PATTERNS_DIR/index``)."""

from __future__ import annotations

from pathlib import Path

INDEX_SUBDIR = "index"


def build_index_for_tasks(tasks_file: Path, patterns_dir: Path, encoder_path: Path | None = None) -> Path:
    """Embed every task's calibration queries and examples; save the index under ``patterns_dir``."""
    from retrieval.encoder import Encoder
    from retrieval.index import build_task_index
    from retrieval.task_texts import texts_by_task
    from retrieval.tasks_file import load_tasks_file

    encoder = Encoder.load(encoder_path)
    index = build_task_index(encoder, texts_by_task(load_tasks_file(tasks_file)))
    directory = Path(patterns_dir) / INDEX_SUBDIR
    index.save(directory)
    return directory
