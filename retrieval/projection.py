"""The task space: encoder vectors whitened by how a task's own texts vary (shrunk LDA).

A sentence encoder puts a request's *content* and its *instruction* in the same vector. Texts of
one task differ by content (the word to reverse, the numbers to add) and by wording; neither says
which task it is, yet both move the vector, so a new wording with new content can land nearer
another task's texts. Whitening by the within-task scatter shrinks exactly those directions and
stretches the ones along which tasks differ: a nearest-neighbour vote in this space follows the
instruction more than the content (Fisher's linear discriminant, used the same way on speaker
embeddings). Fitted on the index's own labelled texts, so nothing outside the index is needed.

The space only decides *which* task: whether a query resembles anything stored at all is still
judged by the encoder's own cosine, since whitening also stretches directions that no stored text
uses and so cannot say that a query is unlike all of them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from expert_store.errors import RetrievalIndexError

logger = logging.getLogger(__name__)

PROJECTION_FILE = "projection.safetensors"


@dataclass(frozen=True, slots=True, eq=False)
class TaskProjection:
    """``x -> normalise((x - mean) @ matrix)``; ``matrix`` [D, D] whitens the within-task scatter.

    ``shrinkage`` in [0, 1] blends that scatter with a multiple of the identity before whitening:
    0 trusts the scatter entirely (unstable with few texts per task), 1 is plain centring.
    """

    mean: np.ndarray  # [D] float32
    matrix: np.ndarray  # [D, D] float32
    shrinkage: float

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def fit(cls, vectors: np.ndarray, labels: np.ndarray, shrinkage: float = 0.5) -> TaskProjection | None:
        """Fit on unit vectors [N, D] labelled with task ids [N]; None when there is nothing to learn
        (one task, or no task with two texts: no within-task scatter to measure)."""
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage must lie in [0, 1], got {shrinkage}")
        vectors = np.asarray(vectors, dtype=np.float64)  # [N, D]; float64: the scatter sums N outer products
        tasks, counts = np.unique(labels, return_counts=True)
        if len(tasks) < 2 or counts.max() < 2:
            logger.info("no task projection: it needs two tasks and a task with two texts")
            return None
        centred = np.empty_like(vectors)  # [N, D], each text minus its task's mean
        for task in tasks:
            rows = labels == task
            centred[rows] = vectors[rows] - vectors[rows].mean(axis=0)
        scatter = centred.T @ centred / len(vectors)  # [D, D]
        dim = scatter.shape[0]
        scatter = (1.0 - shrinkage) * scatter + shrinkage * (np.trace(scatter) / dim) * np.eye(dim)
        eigenvalues, eigenvectors = np.linalg.eigh(scatter)
        # The identity term keeps every eigenvalue positive unless shrinkage is 0 and texts are few.
        floor = max(eigenvalues.max(), 1e-12) * 1e-6
        matrix = eigenvectors / np.sqrt(np.maximum(eigenvalues, floor))  # [D, D]
        return cls(vectors.mean(axis=0).astype(np.float32), matrix.astype(np.float32), float(shrinkage))

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        """Unit vectors [N, D] of the task space for encoder vectors [N, D]."""
        projected = (np.asarray(vectors, dtype=np.float32) - self.mean) @ self.matrix  # [N, D]
        norms = np.linalg.norm(projected, axis=1, keepdims=True)
        return np.ascontiguousarray(projected / np.maximum(norms, 1e-12), dtype=np.float32)

    def save(self, path: Path) -> None:
        """Write the mean and matrix to the safetensors file ``path``."""
        save_file(
            {"mean": self.mean, "matrix": self.matrix},
            str(path),
            metadata={"shrinkage": repr(self.shrinkage)},
        )

    @classmethod
    def load(cls, directory: Path, dim: int, shrinkage: float) -> TaskProjection:
        """Read ``directory``/:data:`PROJECTION_FILE`, checked against the index's dimension."""
        path = directory / PROJECTION_FILE
        try:
            tensors = load_file(str(path))
            mean, matrix = tensors["mean"], tensors["matrix"]
        except Exception as error:  # missing file, bad header, missing tensor: all mean rebuild
            raise RetrievalIndexError(f"cannot read {path}: {error}; rebuild it with `taer index`") from None
        if mean.shape != (dim,) or matrix.shape != (dim, dim):
            raise RetrievalIndexError(
                f"{path} holds a projection of shape {matrix.shape}, the index has dimension {dim}; "
                "rebuild it with `taer index`"
            )
        return cls(mean.astype(np.float32), matrix.astype(np.float32), shrinkage)
