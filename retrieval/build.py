"""The retrieval index that `taer calibrate` and `taer index` write beside the patterns
(``PATTERNS_DIR/index``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from expert_store.errors import RetrievalIndexError
from retrieval.encoder import Encoder
from retrieval.index import DEFAULT_RULE, DEFAULT_SETTINGS, IndexSettings, TaskIndex, build_task_index
from retrieval.task_texts import texts_by_task
from retrieval.tasks_file import load_tasks_file
from retrieval.vote import VoteRule

INDEX_SUBDIR = "index"


@dataclass(frozen=True, slots=True)
class IndexOptions:
    """How an index is built: its kind, when its vote is trusted, and how FAISS and the task space
    are set up (each defaults to :mod:`retrieval.index`'s defaults)."""

    kind: str = "auto"
    rule: VoteRule = DEFAULT_RULE
    settings: IndexSettings = DEFAULT_SETTINGS

    @classmethod
    def with_overrides(
        cls,
        kind: str = "auto",
        *,
        min_confidence: float | None = None,
        min_similarity: float | None = None,
        close_margin: float | None = None,
        hnsw_threshold: int | None = None,
        shrinkage: float | None = None,
        task_space: bool = True,
    ) -> IndexOptions:
        """The defaults with each value given replaced (None keeps the default); bad values are a
        :class:`RetrievalIndexError` naming the value."""
        default = cls(kind)
        thresholds = {"min_confidence": min_confidence, "min_similarity": min_similarity}
        thresholds["close_margin"] = close_margin
        try:
            rule = dataclasses.replace(default.rule, **{k: v for k, v in thresholds.items() if v is not None})
        except ValueError as error:  # the rule checks its own ranges
            raise RetrievalIndexError(f"bad retrieval threshold: {error}") from None
        settings = default.settings
        if hnsw_threshold is not None:
            settings = dataclasses.replace(settings, hnsw_threshold=hnsw_threshold)
        if not task_space:
            settings = dataclasses.replace(settings, projection_shrinkage=None)
        elif shrinkage is not None:
            if not 0.0 <= shrinkage <= 1.0:
                raise RetrievalIndexError(f"--shrinkage must lie in [0, 1], got {shrinkage}")
            settings = dataclasses.replace(settings, projection_shrinkage=shrinkage)
        return cls(kind, rule, settings)


@dataclass(frozen=True, slots=True)
class BuiltIndex:
    index: TaskIndex
    directory: Path


def build_index_for_tasks(
    tasks_file: Path,
    patterns_dir: Path,
    encoder_path: str | Path | None = None,
    options: IndexOptions = IndexOptions(),
) -> BuiltIndex:
    """Embed every task's calibration queries and examples; save the index under ``patterns_dir``.

    ``encoder_path``: a model directory or a name taer knows (see :meth:`Encoder.load`); None: MiniLM.
    """
    texts = texts_by_task(load_tasks_file(tasks_file))
    encoder = Encoder.load(encoder_path)
    index = build_task_index(encoder, texts, kind=options.kind, rule=options.rule, settings=options.settings)
    directory = index.save(Path(patterns_dir) / INDEX_SUBDIR)
    return BuiltIndex(index, Path(directory))
