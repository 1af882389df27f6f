"""The task space: the whitening itself, what it changes in a vote, and how it is stored."""

from __future__ import annotations

import json

import numpy as np
import pytest

from expert_store.errors import RetrievalIndexError
from retrieval.encoder import EncoderFingerprint
from retrieval.index import IndexSettings, TaskIndex
from retrieval.index_io import METADATA_FILE, TASK_SPACE_FILE
from retrieval.projection import PROJECTION_FILE, TaskProjection
from retrieval.vote import VoteRule, vote

DIM = 16


class VectorEncoder:
    """An encoder whose 'texts' are keys into a table of vectors, so tests choose the geometry."""

    fingerprint = EncoderFingerprint("table", DIM, "0" * 16)
    dim = DIM

    def __init__(self, table: dict[str, np.ndarray]) -> None:
        self.table = table

    def encode(self, texts: list[str]) -> np.ndarray:
        rows = np.stack([self.table[text] for text in texts]).astype(np.float32)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def content_heavy_tasks(seed: int = 0, per_task: int = 40) -> tuple[np.ndarray, list[str]]:
    """Two tasks told apart by a small offset on axis 0; large content on axes 1-3 that both share,
    like the word a request asks to reverse or upper-case."""
    rng = np.random.default_rng(seed)
    vectors, tasks = [], []
    for task, sign in (("a", 1.0), ("b", -1.0)):
        rows = rng.normal(0.0, 0.02, (per_task, DIM))
        rows[:, 0] += 0.15 * sign
        rows[:, 1:4] += rng.normal(0.0, 1.0, (per_task, 3))
        rows[:, 4] += 1.0  # every text shares a common component, as real embeddings do
        vectors.append(rows)
        tasks += [task] * per_task
    return unit(np.concatenate(vectors)), tasks


def test_fit_whitens_the_shrunk_within_task_scatter():
    vectors, tasks = content_heavy_tasks()
    labels = np.array([t == "b" for t in tasks], dtype=np.int32)
    projection = TaskProjection.fit(vectors, labels, shrinkage=0.3)
    assert projection is not None and projection.dim == DIM
    centred = np.concatenate([vectors[labels == c] - vectors[labels == c].mean(0) for c in (0, 1)])
    scatter = centred.T.astype(np.float64) @ centred / len(vectors)
    shrunk = 0.7 * scatter + 0.3 * np.trace(scatter) / DIM * np.eye(DIM)
    np.testing.assert_allclose(projection.matrix.T @ shrunk @ projection.matrix, np.eye(DIM), atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(projection.apply(vectors), axis=1), 1.0, atol=1e-5)


def test_fit_needs_two_tasks_and_a_repeated_one():
    vectors, _ = content_heavy_tasks(per_task=3)
    assert TaskProjection.fit(vectors, np.zeros(len(vectors), np.int32)) is None  # one task
    assert TaskProjection.fit(vectors[:2], np.array([0, 1])) is None  # no task has two texts
    with pytest.raises(ValueError, match="shrinkage must lie in"):
        TaskProjection.fit(vectors, np.arange(len(vectors)) % 2, shrinkage=1.5)


def test_task_space_follows_the_task_where_content_misleads_the_encoder():
    vectors, tasks = content_heavy_tasks()
    texts = [f"text {i}" for i in range(len(tasks))]
    encoder = VectorEncoder(dict(zip(texts, vectors, strict=True)))
    rule = VoteRule(min_similarity=0.0)
    # Little shrinkage: 80 texts in 16 dimensions measure the scatter well.
    settings = IndexSettings(projection_shrinkage=0.1)
    spaced = TaskIndex.from_vectors(encoder, vectors, tasks, texts, kind="flat", rule=rule, settings=settings)
    plain_settings = IndexSettings(projection_shrinkage=None)
    plain = TaskIndex.from_vectors(
        encoder, vectors, tasks, texts, kind="flat", rule=rule, settings=plain_settings
    )
    assert spaced.task_space is not None and plain.task_space is None
    # New requests with new content: the content decides the encoder's neighbours, the small task
    # offset the task space's.
    queries, truth = content_heavy_tasks(seed=1)
    plain_right = np.mean(
        [vote(n, rule).task == t for n, t in zip(plain.search(queries), truth, strict=True)]
    )
    spaced_right = np.mean(
        [vote(n, rule).task == t for n, t in zip(spaced.search(queries), truth, strict=True)]
    )
    assert plain_right < 0.7 and spaced_right > 0.95  # measured 0.575 and 0.9875
    # The min_similarity gate reads the encoder's cosine, whichever space voted.
    for neighbours in spaced.search(queries[:5]):
        result = vote(neighbours, rule)
        assert result.similarity == max(n.cosine for n in neighbours if n.task == result.candidate)


def test_neighbour_cosines_are_the_encoder_cosines():
    vectors, tasks = content_heavy_tasks()
    texts = [f"text {i}" for i in range(len(tasks))]
    index = TaskIndex.from_vectors(
        VectorEncoder(dict(zip(texts, vectors, strict=True))), vectors, tasks, texts
    )
    queries = vectors[:3]
    for query, neighbours in zip(queries, index.search(queries, k=5), strict=True):
        assert neighbours[0].text_id in range(3)  # itself is nearest in any space
        for n in neighbours:
            assert n.cosine == pytest.approx(float(vectors[n.text_id] @ query), abs=1e-5)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_task_space_round_trips(tmp_path, kind):
    vectors, tasks = content_heavy_tasks()
    texts = [f"text {i}" for i in range(len(tasks))]
    encoder = VectorEncoder(dict(zip(texts, vectors, strict=True)))
    built = TaskIndex.from_vectors(encoder, vectors, tasks, texts, kind=kind)
    directory = built.save(tmp_path / "idx")
    assert (directory / TASK_SPACE_FILE).is_file() and (directory / PROJECTION_FILE).is_file()
    loaded = TaskIndex.load(directory, encoder)
    assert loaded.task_space is not None
    np.testing.assert_array_equal(loaded.task_space.projection.matrix, built.task_space.projection.matrix)
    assert loaded.query(texts[:10]) == built.query(texts[:10])


def test_saving_without_a_task_space_removes_the_old_one(tmp_path):
    vectors, tasks = content_heavy_tasks()
    texts = [f"text {i}" for i in range(len(tasks))]
    encoder = VectorEncoder(dict(zip(texts, vectors, strict=True)))
    TaskIndex.from_vectors(encoder, vectors, tasks, texts).save(tmp_path / "idx")
    plain = IndexSettings(projection_shrinkage=None)
    TaskIndex.from_vectors(encoder, vectors, tasks, texts, settings=plain).save(tmp_path / "idx")
    assert not (tmp_path / "idx" / TASK_SPACE_FILE).exists()
    assert not (tmp_path / "idx" / PROJECTION_FILE).exists()
    assert TaskIndex.load(tmp_path / "idx", encoder).task_space is None


def test_format_1_index_loads_and_votes_on_encoder_vectors(tmp_path):
    vectors, tasks = content_heavy_tasks()
    texts = [f"text {i}" for i in range(len(tasks))]
    encoder = VectorEncoder(dict(zip(texts, vectors, strict=True)))
    plain = IndexSettings(projection_shrinkage=None)
    built = TaskIndex.from_vectors(encoder, vectors, tasks, texts, settings=plain)
    directory = built.save(tmp_path / "idx")
    metadata = json.loads((directory / METADATA_FILE).read_text())
    metadata["format_version"] = 1
    del metadata["projection"]
    del metadata["settings"]["projection_shrinkage"]
    (directory / METADATA_FILE).write_text(json.dumps(metadata))
    loaded = TaskIndex.load(directory, encoder)
    assert loaded.task_space is None
    assert loaded.query(texts[:10]) == built.query(texts[:10])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / TASK_SPACE_FILE).unlink(), "task_space.faiss"),
        (lambda d: (d / PROJECTION_FILE).write_bytes(b"not safetensors"), "projection.safetensors"),
        (lambda d: _rewrite_metadata(d, projection={"shrinkage": "half"}), "malformed projection"),
    ],
)
def test_damaged_task_space_is_refused(tmp_path, damage, message):
    vectors, tasks = content_heavy_tasks()
    texts = [f"text {i}" for i in range(len(tasks))]
    encoder = VectorEncoder(dict(zip(texts, vectors, strict=True)))
    directory = TaskIndex.from_vectors(encoder, vectors, tasks, texts).save(tmp_path / "idx")
    damage(directory)
    with pytest.raises(RetrievalIndexError, match=message):
        TaskIndex.load(directory, encoder)


def test_projection_of_another_dimension_is_refused(tmp_path):
    vectors, tasks = content_heavy_tasks()
    labels = np.array([t == "b" for t in tasks], dtype=np.int32)
    TaskProjection.fit(vectors, labels).save(tmp_path / PROJECTION_FILE)
    with pytest.raises(RetrievalIndexError, match="dimension 8"):
        TaskProjection.load(tmp_path, dim=8, shrinkage=0.5)


def _rewrite_metadata(directory, **changes) -> None:
    metadata = json.loads((directory / METADATA_FILE).read_text())
    metadata.update(changes)
    (directory / METADATA_FILE).write_text(json.dumps(metadata))
