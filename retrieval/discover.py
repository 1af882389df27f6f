"""Tasks from unlabelled prompts: cluster their sentence vectors and choose how many tasks there are.

On the encoder's unit vectors (the vectors the retrieval index stores):

1. A prompt with fewer than ``neighbours`` other prompts at a cosine of at least ``min_similarity``
   fits no task: it goes to the ``general`` pool. The default threshold is the retrieval vote's own
   (below it a query is served by ``general`` as unlike anything stored), so a prompt left out here
   is one that a task's index entries would not have matched either.
2. The rest are clustered by Ward's agglomerative clustering (scikit-learn's ``ward_tree``), a
   hierarchy of ever finer splits. The number of tasks K is the largest number of clusters in that
   hierarchy whose every cluster holds at least ``min_size`` prompts (``num_clusters`` fixes it
   instead). Not the best silhouette: the wordings of one task are often as well separated as the
   tasks themselves, so the silhouette keeps rising past the tasks into their wordings (on the
   demo's 384 calibration prompts: 0.26 at the six tasks, 0.31 at 14 clusters, which split each
   task by wording). A group smaller than ``min_size`` could not be calibrated and held out anyway.
   The default, 32 (25 prompts to calibrate and 7 held out at 20%), also sits in the middle of the
   range that finds the demo's six tasks (24 to 48 on its calibration prompts, 24 and more on its
   evaluation prompts, whose wordings hold 13 and 20 prompts each): a task much smaller than that
   is not told from one wording of a larger task. ``min_size`` counts the prompts clustered (the
   sample, for a log larger than ``max_fit``).
3. How separated the clusters are: each cluster's mean silhouette (cosine) and its median
   nearest-centroid margin (a prompt's cosine to its own centroid minus that to the nearest other).

A log of more than ``max_fit`` prompts is clustered on a seeded sample of that many (Ward's method
needs memory quadratic in the prompts); every other prompt joins the cluster of its nearest centroid,
or ``general`` when no sampled prompt is within ``min_similarity`` of it.
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass, field

import numpy as np

from expert_store.errors import DiscoveryError
from retrieval.vote import VoteRule

logger = logging.getLogger(__name__)

NOISE = -1
_SILHOUETTE_SAMPLE = 2_000  # prompts the silhouette is estimated on (it is quadratic in them)
_CHUNK = 1_024  # rows of a similarity matrix computed at once


@dataclass(frozen=True, slots=True)
class DiscoveryOptions:
    """How prompts are clustered; see the module docstring."""

    num_clusters: int | None = None
    min_size: int = 32
    min_similarity: float = VoteRule().min_similarity
    neighbours: int = 4
    max_fit: int = 5_000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_clusters is not None and self.num_clusters < 1:
            raise DiscoveryError(f"--clusters must be at least 1, got {self.num_clusters}")
        if self.min_size < 2:
            raise DiscoveryError(f"--min-size must be at least 2, got {self.min_size}")
        if not -1.0 <= self.min_similarity <= 1.0:
            raise DiscoveryError(f"--min-similarity must lie in [-1, 1], got {self.min_similarity}")
        if self.neighbours < 1 or self.max_fit < 2:
            raise DiscoveryError("neighbours must be at least 1 and max_fit at least 2")


DEFAULT_OPTIONS = DiscoveryOptions()


@dataclass(frozen=True, slots=True)
class Cluster:
    """One discovered task: its prompts (indices), most central first, and how separated it is.

    ``centrality``: each member's cosine to the cluster's mean direction, in ``members``' order.
    ``silhouette``: the mean silhouette (cosine) of its clustered members; None with one cluster.
    ``margin``: the median of its members' nearest-centroid margins; None with one cluster.
    """

    members: tuple[int, ...]
    centrality: tuple[float, ...]
    silhouette: float | None
    margin: float | None

    @property
    def size(self) -> int:
        return len(self.members)


@dataclass(frozen=True, slots=True)
class Discovery:
    """The clusters of N prompts. ``labels`` [N]: each prompt's cluster index, or :data:`NOISE`.

    ``chosen_by``: ``"min_size"`` (K from the data) or ``"fixed"`` (``num_clusters``).
    ``silhouette_by_k``: the silhouette the hierarchy's cut at each K would have, for comparison.
    """

    labels: np.ndarray
    clusters: tuple[Cluster, ...]
    chosen_by: str
    silhouette: float | None
    silhouette_by_k: dict[int, float] = field(default_factory=dict)
    num_fitted: int = 0

    @property
    def noise(self) -> tuple[int, ...]:
        """The prompts that fit no cluster, in input order."""
        return tuple(int(i) for i in np.flatnonzero(self.labels == NOISE))


def cluster_prompts(vectors: np.ndarray, options: DiscoveryOptions = DEFAULT_OPTIONS) -> Discovery:
    """Cluster unit vectors [N, D] (see the module docstring)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # [N, D]
    if vectors.ndim != 2 or len(vectors) == 0:
        raise DiscoveryError("no prompts to cluster")
    fit = _sample(len(vectors), options.max_fit, options.seed)
    dense = fit[_is_dense(vectors[fit], options)]
    if len(dense) == 0:
        raise DiscoveryError(
            f"no prompt has {options.neighbours} others within cosine {options.min_similarity}: the log holds "
            "no repeated kind of work to make a task of (lower --min-similarity to group looser prompts)"
        )
    points = vectors[dense]  # [M, D]
    children = _ward_children(points)
    sizes = _node_sizes(children, len(points))
    if options.num_clusters is not None:
        k, chosen_by = min(options.num_clusters, len(points)), "fixed"
    else:
        k, chosen_by = _largest_k(children, sizes, len(points), options.min_size), "min_size"
    fitted = _cut(children, len(points), k)  # [M]
    labels = np.full(len(vectors), NOISE, dtype=np.int64)
    labels[dense] = fitted
    centroids = _centroids(vectors, labels, k)  # [K, D]
    rest = np.setdiff1d(np.arange(len(vectors)), fit)
    labels[rest] = _assign(vectors[rest], points, centroids, options.min_similarity)
    labels = _by_size(labels)
    centroids = _centroids(vectors, labels, k)
    silhouettes = _silhouettes(points, labels[dense], k, options.seed)
    clusters = _clusters(vectors, labels, centroids, silhouettes, labels[dense])
    by_k = {
        n: _silhouette(points, _cut(children, len(points), n), options.seed)
        for n in range(2, min(max(k + 4, 8), len(points) - 1) + 1)
    }
    overall = _silhouette(points, labels[dense], options.seed) if 1 < k < len(points) else None
    logger.info("%d prompts: %d clusters (%s), %d fit none", len(vectors), k, chosen_by, (labels < 0).sum())
    return Discovery(labels, clusters, chosen_by, overall, by_k, len(fit))


def _sample(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded sample of ``size`` of ``n`` (all of them when ``n <= size``)."""
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def _is_dense(points: np.ndarray, options: DiscoveryOptions) -> np.ndarray:
    """[M] bool: the points with at least ``neighbours`` others at cosine >= ``min_similarity``."""
    counts = np.empty(len(points), dtype=np.int64)
    for start in range(0, len(points), _CHUNK):
        similar = points[start : start + _CHUNK] @ points.T >= options.min_similarity  # [B, M]
        counts[start : start + _CHUNK] = similar.sum(axis=1) - 1  # not itself
    return counts >= options.neighbours


def _ward_children(points: np.ndarray) -> np.ndarray:
    """[M - 1, 2]: merge i joins these two nodes into node M + i (leaves are 0..M-1)."""
    if len(points) == 1:
        return np.zeros((0, 2), dtype=np.int64)
    from sklearn.cluster import ward_tree

    children, _, _, _ = ward_tree(points)
    return np.asarray(children, dtype=np.int64)


def _node_sizes(children: np.ndarray, n: int) -> np.ndarray:
    sizes = np.ones(n + len(children), dtype=np.int64)
    for i, (a, b) in enumerate(children):
        sizes[n + i] = sizes[a] + sizes[b]
    return sizes


def _largest_k(children: np.ndarray, sizes: np.ndarray, n: int, min_size: int) -> int:
    """Undo Ward's merges from the last while both halves of each hold >= ``min_size`` points.

    The hierarchy is nested: once a split leaves a part below ``min_size``, every finer cut keeps a
    part that small, so the first such split bounds K.
    """
    k = 1
    for a, b in children[::-1]:
        if min(sizes[a], sizes[b]) < min_size:
            break
        k += 1
    return k


def _cut(children: np.ndarray, n: int, k: int) -> np.ndarray:
    """[n] labels 0..k-1 of the hierarchy cut into ``k`` clusters (the last k - 1 merges undone)."""
    roots = [-(n + len(children) - 1)]  # a max-heap of node ids: the latest merge is undone first
    while len(roots) < k:
        node = -heapq.heappop(roots)
        for child in children[node - n]:
            heapq.heappush(roots, -int(child))
    labels = np.empty(n, dtype=np.int64)
    for label, root in enumerate(sorted(-r for r in roots)):
        stack = [root]
        while stack:
            node = stack.pop()
            if node < n:
                labels[node] = label
            else:
                stack.extend(int(c) for c in children[node - n])
    return labels


def _centroids(vectors: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """[K, D] unit mean directions of each cluster's members."""
    sums = np.zeros((k, vectors.shape[1]), dtype=np.float64)
    np.add.at(sums, labels[labels >= 0], vectors[labels >= 0])
    return (sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _assign(rest: np.ndarray, points: np.ndarray, centroids: np.ndarray, min_similarity: float) -> np.ndarray:
    """Prompts left out of the fit: the nearest centroid's cluster, or noise when unlike every point."""
    labels = np.full(len(rest), NOISE, dtype=np.int64)
    for start in range(0, len(rest), _CHUNK):
        chunk = rest[start : start + _CHUNK]  # [B, D]
        near = (chunk @ points.T).max(axis=1) >= min_similarity  # [B]
        nearest = (chunk @ centroids.T).argmax(axis=1)  # [B]
        labels[start : start + _CHUNK] = np.where(near, nearest, NOISE)
    return labels


def _by_size(labels: np.ndarray) -> np.ndarray:
    """Relabel clusters largest first (ties: the one seen first)."""
    found = [int(c) for c in dict.fromkeys(labels.tolist()) if c != NOISE]
    order = sorted(found, key=lambda c: -int((labels == c).sum()))
    mapping = {old: new for new, old in enumerate(order)}
    return np.array([mapping.get(int(c), NOISE) for c in labels], dtype=np.int64)


def _silhouette(points: np.ndarray, labels: np.ndarray, seed: int) -> float:
    from sklearn.metrics import silhouette_score

    sample = min(len(points), _SILHOUETTE_SAMPLE)
    return float(silhouette_score(points, labels, metric="cosine", sample_size=sample, random_state=seed))


def _silhouettes(points: np.ndarray, labels: np.ndarray, k: int, seed: int) -> np.ndarray | None:
    """[M] each point's silhouette (on a sample of at most ``_SILHOUETTE_SAMPLE``; others NaN)."""
    if not 1 < k < len(points):
        return None
    from sklearn.metrics import silhouette_samples

    values = np.full(len(points), np.nan)
    rows = _sample(len(points), _SILHOUETTE_SAMPLE, seed)
    if len(np.unique(labels[rows])) > 1:
        values[rows] = silhouette_samples(points[rows], labels[rows], metric="cosine")
    return values


def _clusters(
    vectors: np.ndarray,
    labels: np.ndarray,
    centroids: np.ndarray,
    silhouettes: np.ndarray | None,
    fitted_labels: np.ndarray,
) -> tuple[Cluster, ...]:
    similarity = vectors @ centroids.T  # [N, K]
    clusters = []
    for c in range(len(centroids)):
        members = np.flatnonzero(labels == c)
        own = similarity[members, c]
        order = np.argsort(-own, kind="stable")
        silhouette = margin = None
        if len(centroids) > 1:
            others = np.delete(similarity[members], c, axis=1).max(axis=1)
            margin = float(np.median(own - others))
            values = silhouettes[fitted_labels == c] if silhouettes is not None else np.array([])
            silhouette = float(np.nanmean(values)) if np.isfinite(values).any() else None
        clusters.append(
            Cluster(
                members=tuple(int(i) for i in members[order]),
                centrality=tuple(float(s) for s in own[order]),
                silhouette=silhouette,
                margin=margin,
            )
        )
    return tuple(clusters)
