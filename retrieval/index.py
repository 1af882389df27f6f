"""The task index: labelled example texts in FAISS, queried by cosine similarity and a weighted vote.

Vectors are L2-normalised, so FAISS inner product is cosine similarity. A flat (exact) index serves
up to ``IndexSettings.hnsw_threshold`` vectors; above it, or when asked, an HNSW graph does.

The vote runs in the task space (:mod:`retrieval.projection`) when the index has one, as it does by
default: the stored texts are whitened by their within-task scatter, so that the neighbours follow
the instruction rather than the content of a request. Whether a query is like anything stored (the
``min_similarity`` rule) is still judged by the encoder's own cosine to the winner's neighbours.

On disk an index is a directory with the FAISS file(s), the projection and a JSON file of labels,
texts and the fingerprint of the encoder that built it (see :mod:`retrieval.index_io`); loading
refuses another encoder.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import faiss
import numpy as np
from tqdm import tqdm

from expert_store.errors import RetrievalIndexError
from retrieval.encoder import EncoderFingerprint, TextEncoder
from retrieval.index_io import (
    FORMAT_VERSION,
    TASK_SPACE_FILE,
    read_faiss_index,
    read_metadata,
    write_index_files,
)
from retrieval.projection import TaskProjection
from retrieval.vote import Neighbour, RetrievalResult, VoteRule, empty_result, vote

logger = logging.getLogger(__name__)

IndexKind = Literal["flat", "hnsw", "auto"]
_CHUNK = 256  # texts encoded / vectors added per step; also the progress bar's unit
_PROGRESS_MIN = 4 * _CHUNK  # no progress bar for inputs that take well under a second


@dataclass(frozen=True, slots=True)
class IndexSettings:
    """How the FAISS index is built and searched.

    ``num_threads`` is FAISS's OpenMP thread count while it adds or searches; it stays low because the index
    runs beside the model, and one query over 10^5 vectors needs no more. ``projection_shrinkage``:
    the task space's shrinkage (see :class:`TaskProjection`), or None to vote on the encoder's
    vectors directly.
    """

    hnsw_threshold: int = 20_000
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    num_threads: int = 1
    projection_shrinkage: float | None = 0.5

    def resolve_kind(self, kind: str, num_vectors: int) -> str:
        if kind == "auto":
            return "hnsw" if num_vectors >= self.hnsw_threshold else "flat"
        if kind not in ("flat", "hnsw"):
            raise RetrievalIndexError(f"unknown index kind {kind!r}; use 'flat', 'hnsw' or 'auto'")
        return kind


# Frozen, so sharing one instance as a default is safe.
DEFAULT_RULE = VoteRule()
DEFAULT_SETTINGS = IndexSettings()


class TaskIndex:
    """Maps a query text to the task whose stored examples it resembles most.

    Build one with :func:`build_task_index` (texts) or :meth:`from_vectors`; reopen a saved one with
    :meth:`load`. ``rule`` holds the default thresholds; :meth:`query` may override them per call.
    """

    def __init__(
        self,
        encoder: TextEncoder,
        index: faiss.Index,
        tasks: list[str],
        labels: np.ndarray,
        texts: list[str],
        kind: str,
        created: str,
        rule: VoteRule = DEFAULT_RULE,
        settings: IndexSettings = DEFAULT_SETTINGS,
        task_space: TaskSpace | None = None,
    ) -> None:
        if index.ntotal == 0:
            raise RetrievalIndexError("a task index needs at least one vector; give each task example texts")
        assert index.ntotal == len(labels) == len(texts), "one label and one text per vector"
        assert index.d == encoder.dim, "index and encoder dimensions agree"
        assert task_space is None or task_space.index.ntotal == index.ntotal, "one task-space vector per text"
        self.encoder = encoder
        self.index = index  # the encoder's vectors
        self.task_space = task_space
        self.tasks = tasks
        self.labels = labels  # [N] int32, position in ``tasks``
        self.texts = texts
        self.kind = kind
        self.created = created
        self.rule = rule
        self.settings = settings

    @classmethod
    def from_vectors(
        cls,
        encoder: TextEncoder,
        vectors: np.ndarray,
        task_of_vector: list[str],
        texts: list[str],
        kind: IndexKind = "auto",
        rule: VoteRule = DEFAULT_RULE,
        settings: IndexSettings = DEFAULT_SETTINGS,
    ) -> TaskIndex:
        """Index ready-made vectors [N, D] (one task name and one text each), normalising them."""
        if len(vectors) == 0:
            raise RetrievalIndexError("a task index needs at least one vector; give each task example texts")
        if vectors.ndim != 2 or vectors.shape[1] != encoder.dim:
            raise RetrievalIndexError(
                f"vectors of shape {vectors.shape} do not fit encoder {encoder.fingerprint} (dim {encoder.dim})"
            )
        if not len(vectors) == len(task_of_vector) == len(texts):
            raise RetrievalIndexError(
                f"{len(vectors)} vectors but {len(task_of_vector)} labels and {len(texts)} texts"
            )
        # A copy: normalising in place must not change the caller's array.
        vectors = np.array(vectors, dtype=np.float32, order="C", copy=True)  # [N, D]
        faiss.normalize_L2(vectors)
        resolved = settings.resolve_kind(kind, len(vectors))
        index = _new_faiss_index(resolved, encoder.dim, settings)
        _add_in_chunks(index, vectors, settings)
        tasks = sorted(set(task_of_vector))
        task_id = {task: i for i, task in enumerate(tasks)}
        labels = np.fromiter((task_id[task] for task in task_of_vector), dtype=np.int32, count=len(vectors))
        task_space = TaskSpace.fit(vectors, labels, resolved, settings)
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return cls(encoder, index, tasks, labels, list(texts), resolved, created, rule, settings, task_space)

    @property
    def size(self) -> int:
        """Number of stored vectors."""
        return int(self.index.ntotal)

    @property
    def fingerprint(self) -> EncoderFingerprint:
        return self.encoder.fingerprint

    def query(
        self,
        texts: list[str],
        k: int = 8,
        min_confidence: float | None = None,
        min_similarity: float | None = None,
    ) -> list[RetrievalResult]:
        """One result per text, in order; the non-empty texts are embedded and searched together.

        Empty or whitespace-only texts get the fallback task with confidence 0 and are not encoded.
        """
        rule = self._rule(min_confidence, min_similarity)
        live = [i for i, text in enumerate(texts) if text.strip()]
        results = [empty_result(rule)] * len(texts)
        if not live:
            return results
        vectors = self.encoder.encode([texts[i] for i in live])  # [Q, D]
        for i, neighbours in zip(live, self.search(vectors, k), strict=True):
            results[i] = vote(neighbours, rule)
        return results

    def search(self, vectors: np.ndarray, k: int = 8) -> list[tuple[Neighbour, ...]]:
        """The ``k`` nearest stored texts for each unit query vector [Q, D] of the encoder, nearest
        first: in the task space when the index has one, each with its encoder cosine as well."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # [Q, D]
        k = min(k, self.size)
        if self.task_space is None:
            with openmp_threads(self.settings.num_threads):
                similarities, ids = self.index.search(vectors, k)  # [Q, k] each
            cosines = similarities
        else:
            projected = self.task_space.projection.apply(vectors)  # [Q, D]
            with openmp_threads(self.settings.num_threads):
                similarities, ids = self.task_space.index.search(projected, k)
            # The encoder's cosine to each neighbour, from the stored vectors: [Q, k]
            stored = self.index.reconstruct_batch(np.maximum(ids, 0).ravel()).reshape(*ids.shape, -1)
            cosines = np.einsum("qkd,qd->qk", stored, vectors)
        return [
            tuple(
                Neighbour(self.tasks[self.labels[i]], float(s), int(i), float(c))
                for s, i, c in zip(row_s, row_i, row_c, strict=True)
                if i >= 0  # HNSW pads with -1 when it finds fewer than k
            )
            for row_s, row_i, row_c in zip(similarities, ids, cosines, strict=True)
        ]

    def save(self, directory: str | Path) -> Path:
        """Write ``index.faiss`` and ``index.json`` into ``directory`` (created if missing)."""
        directory = Path(directory)
        metadata = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "dim": int(self.index.d),
            "size": self.size,
            "encoder": str(self.fingerprint),
            "created": self.created,
            "rule": dataclasses.asdict(self.rule),
            "settings": dataclasses.asdict(self.settings),
            "projection": None
            if self.task_space is None
            else {"shrinkage": self.task_space.projection.shrinkage},
            "tasks": self.tasks,
            "labels": self.labels.tolist(),
            "texts": self.texts,
        }
        task_space = None if self.task_space is None else (self.task_space.projection, self.task_space.index)
        write_index_files(directory, self.index, metadata, task_space)
        logger.info(
            "saved %s task index (%d vectors, %d tasks) to %s",
            self.kind,
            self.size,
            len(self.tasks),
            directory,
        )
        return directory

    @classmethod
    def load(
        cls,
        directory: str | Path,
        encoder: TextEncoder,
        rule: VoteRule | None = None,
        settings: IndexSettings | None = None,
    ) -> TaskIndex:
        """Reopen a saved index; refuse one built with another encoder, from another format, or empty.

        ``rule`` and ``settings`` default to those saved with the index.
        """
        directory = Path(directory)
        metadata = read_metadata(directory)
        try:
            built_with = EncoderFingerprint.parse(metadata["encoder"])
            rule = rule or VoteRule(**metadata["rule"])
            settings = settings or IndexSettings(**metadata["settings"])
        except (TypeError, ValueError) as error:
            raise RetrievalIndexError(
                f"{directory}: malformed metadata ({error}); rebuild it with `taer index`"
            ) from None
        if not built_with.matches(encoder.fingerprint):
            raise RetrievalIndexError(
                f"index {directory} was built with encoder {built_with} but is queried with "
                f"{encoder.fingerprint}; rebuild it with `taer index` or pass the encoder it was built with "
                f"({built_with.name}: --encoder NAME_OR_DIR)"
            )
        index = read_faiss_index(directory)
        labels = np.asarray(metadata["labels"], dtype=np.int32)  # [N]
        _check_consistent(directory, index, metadata, labels, encoder.dim)
        task_space = TaskSpace.load(directory, metadata, index)
        if metadata["kind"] == "hnsw":
            for graph in (index, None if task_space is None else task_space.index):
                if graph is not None:
                    faiss.downcast_index(graph).hnsw.efSearch = settings.ef_search
        return cls(
            encoder,
            index,
            list(metadata["tasks"]),
            labels,
            list(metadata["texts"]),
            metadata["kind"],
            metadata["created"],
            rule,
            settings,
            task_space,
        )

    def _rule(self, min_confidence: float | None, min_similarity: float | None) -> VoteRule:
        overrides = {
            name: value
            for name, value in (("min_confidence", min_confidence), ("min_similarity", min_similarity))
            if value is not None
        }
        return dataclasses.replace(self.rule, **overrides) if overrides else self.rule


def build_task_index(
    encoder: TextEncoder,
    texts_by_task: dict[str, list[str]],
    kind: IndexKind = "auto",
    rule: VoteRule = DEFAULT_RULE,
    settings: IndexSettings = DEFAULT_SETTINGS,
) -> TaskIndex:
    """Embed every task's example texts and index them, each labelled with its task.

    Raises :class:`RetrievalIndexError` for no tasks, a task without texts, or an empty text.
    """
    if not texts_by_task:
        raise RetrievalIndexError("no tasks to index; give at least one task with example texts")
    task_of_vector: list[str] = []
    texts: list[str] = []
    for task, task_texts in texts_by_task.items():
        if not task_texts:
            raise RetrievalIndexError(f"task {task!r} has no example texts; add some or drop the task")
        for position, text in enumerate(task_texts):
            if not text.strip():
                raise RetrievalIndexError(f"task {task!r} has an empty text at position {position}")
        task_of_vector.extend([task] * len(task_texts))
        texts.extend(task_texts)
    chunks = [texts[start : start + _CHUNK] for start in range(0, len(texts), _CHUNK)]
    progress = tqdm(chunks, desc="encoding", unit="chunk", disable=len(texts) < _PROGRESS_MIN)
    vectors = np.concatenate([encoder.encode(chunk) for chunk in progress])  # [N, D]
    index = TaskIndex.from_vectors(encoder, vectors, task_of_vector, texts, kind, rule, settings)
    logger.info("built %s task index: %d texts, %d tasks", index.kind, index.size, len(index.tasks))
    return index


def _check_consistent(
    directory: Path, index: faiss.Index, metadata: dict, labels: np.ndarray, dim: int
) -> None:
    if index.ntotal == 0:
        raise RetrievalIndexError(f"index {directory} holds no vectors; rebuild it with `taer index`")
    counts = (index.ntotal, len(labels), len(metadata["texts"]), metadata["size"])
    labels_ok = labels.min() >= 0 and labels.max() < len(metadata["tasks"]) if len(labels) else True
    if len(set(counts)) != 1 or index.d != dim or not labels_ok or metadata["kind"] not in ("flat", "hnsw"):
        raise RetrievalIndexError(
            f"index {directory} is inconsistent: {index.ntotal} vectors of dim {index.d} (encoder: {dim}), "
            f"{len(labels)} labels over {len(metadata['tasks'])} tasks, {len(metadata['texts'])} texts, "
            f"kind {metadata['kind']!r}; rebuild it with `taer index`"
        )


@dataclass(frozen=True, slots=True)
class TaskSpace:
    """The projection and the FAISS index of the stored texts' projected vectors (same ids)."""

    projection: TaskProjection
    index: faiss.Index

    @classmethod
    def fit(
        cls, vectors: np.ndarray, labels: np.ndarray, kind: str, settings: IndexSettings
    ) -> TaskSpace | None:
        """Fit on the stored unit vectors [N, D]; None when disabled or there is nothing to learn."""
        if settings.projection_shrinkage is None:
            return None
        projection = TaskProjection.fit(vectors, labels, settings.projection_shrinkage)
        if projection is None:
            return None
        index = _new_faiss_index(kind, vectors.shape[1], settings)
        _add_in_chunks(index, projection.apply(vectors), settings)
        return cls(projection, index)

    @classmethod
    def load(cls, directory: Path, metadata: dict, stored: faiss.Index) -> TaskSpace | None:
        described = metadata.get("projection")
        if not described:
            return None
        try:
            shrinkage = float(described["shrinkage"])
        except (KeyError, TypeError, ValueError):
            raise RetrievalIndexError(
                f"{directory}: malformed projection metadata {described!r}; rebuild it with `taer index`"
            ) from None
        index = read_faiss_index(directory, TASK_SPACE_FILE)
        if index.ntotal != stored.ntotal or index.d != stored.d:
            raise RetrievalIndexError(
                f"index {directory} is inconsistent: {index.ntotal} task-space vectors of dim {index.d} "
                f"for {stored.ntotal} of dim {stored.d}; rebuild it with `taer index`"
            )
        return cls(TaskProjection.load(directory, stored.d, shrinkage), index)


def _new_faiss_index(kind: str, dim: int, settings: IndexSettings) -> faiss.Index:
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    index = faiss.IndexHNSWFlat(dim, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = settings.ef_construction
    index.hnsw.efSearch = settings.ef_search
    return index


@contextmanager
def openmp_threads(count: int) -> Iterator[None]:
    """Runs FAISS's work on ``count`` OpenMP threads, then gives the calling thread its count back.

    FAISS and torch share one OpenMP runtime whose thread count belongs to the calling thread: left
    set, FAISS's count would become torch's on that thread, and a matmul summed over fewer threads
    differs in its last bits, enough to flip a greedy choice between near-equal tokens.
    """
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(count)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def _add_in_chunks(index: faiss.Index, vectors: np.ndarray, settings: IndexSettings) -> None:
    step = 16 * _CHUNK
    starts = range(0, len(vectors), step)
    with openmp_threads(settings.num_threads):
        for start in tqdm(starts, desc="indexing", unit="chunk", disable=len(vectors) < 16 * _PROGRESS_MIN):
            index.add(vectors[start : start + step])  # [step, D]
