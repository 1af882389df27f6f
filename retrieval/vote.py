"""From k nearest labelled neighbours to one task: a similarity-weighted vote with a fallback.

Pure Python over what the FAISS search returned, so that the rule is tested without an index.
"""

from __future__ import annotations

from dataclasses import dataclass

FALLBACK_TASK = "general"


@dataclass(frozen=True, slots=True)
class Neighbour:
    """One stored text near the query: its task, similarity and position in the index.

    ``similarity`` is where the vote was taken (the task space, or the encoder's vectors when the
    index has no task space) and weighs the vote; ``cosine`` is the encoder's own cosine between
    query and text, which says whether the query is like the text at all (None: equal to
    ``similarity``).
    """

    task: str
    similarity: float
    text_id: int
    cosine: float | None = None

    @property
    def encoder_cosine(self) -> float:
        return self.similarity if self.cosine is None else self.cosine


@dataclass(frozen=True, slots=True)
class VoteRule:
    """When a vote is trusted, and when two tasks are too close to choose between.

    ``min_confidence``: the winner's share of the vote below which the fallback task serves.
    ``min_similarity``: the winner's best cosine similarity below which the fallback task serves
    (a query unlike anything stored). ``close_margin``: a confidence gap between the two best tasks
    below which the result is a close call, so the caller may merge both patterns.
    """

    min_confidence: float = 0.5
    min_similarity: float = 0.35
    close_margin: float = 0.1
    fallback_task: str = FALLBACK_TASK

    def __post_init__(self) -> None:
        for name in ("min_confidence", "close_margin"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if not -1.0 <= self.min_similarity <= 1.0:
            raise ValueError(f"min_similarity must lie in [-1, 1], got {self.min_similarity}")


@dataclass(frozen=True, slots=True)
class RetrievalResult:
    """Which task serves a query, and how sure the index is.

    ``task`` is the task to serve: the vote's winner, or the fallback when the vote is not trusted.
    ``candidate`` is the vote's winner either way (None for an empty query). ``confidence`` is the
    winner's share of the similarity-weighted vote, in [0, 1]; ``similarity`` is the best encoder
    cosine among the winner's neighbours. ``close_call`` says the runner-up is within the rule's
    margin of the winner.
    """

    task: str
    confidence: float
    similarity: float
    candidate: str | None
    runner_up: str | None
    runner_up_confidence: float
    neighbours: tuple[Neighbour, ...]
    is_fallback: bool
    close_call: bool

    @property
    def margin(self) -> float:
        """Confidence gap between the winner and the runner-up."""
        return self.confidence - self.runner_up_confidence


def empty_result(rule: VoteRule) -> RetrievalResult:
    """The result for a query with no text: the fallback task, confidence 0."""
    return RetrievalResult(
        task=rule.fallback_task,
        confidence=0.0,
        similarity=0.0,
        candidate=None,
        runner_up=None,
        runner_up_confidence=0.0,
        neighbours=(),
        is_fallback=True,
        close_call=False,
    )


def vote(neighbours: tuple[Neighbour, ...], rule: VoteRule) -> RetrievalResult:
    """Weight each neighbour by its similarity (negatives count 0), sum per task, pick the largest.

    Ties go to the task whose neighbour came first (the nearest). If no neighbour has a positive
    similarity the nearest one's task is the candidate, with confidence 0.
    """
    if not neighbours:
        return empty_result(rule)
    weights: dict[str, float] = {}  # insertion order = nearest first, which breaks ties
    best_similarity: dict[str, float] = {}
    for neighbour in neighbours:
        weights[neighbour.task] = weights.get(neighbour.task, 0.0) + max(neighbour.similarity, 0.0)
        best = max(best_similarity.get(neighbour.task, -1.0), neighbour.encoder_cosine)
        best_similarity[neighbour.task] = best
    ranked = sorted(weights, key=lambda task: -weights[task])  # stable: ties keep nearest first
    total = sum(weights.values())
    shares = {task: (weights[task] / total if total > 0 else 0.0) for task in ranked}
    winner = ranked[0]
    runner_up = ranked[1] if len(ranked) > 1 else None
    confidence = shares[winner]
    runner_up_confidence = shares[runner_up] if runner_up is not None else 0.0
    similarity = best_similarity[winner]
    is_fallback = total <= 0 or confidence < rule.min_confidence or similarity < rule.min_similarity
    return RetrievalResult(
        task=rule.fallback_task if is_fallback else winner,
        confidence=confidence,
        similarity=similarity,
        candidate=winner,
        runner_up=runner_up,
        runner_up_confidence=runner_up_confidence,
        neighbours=neighbours,
        is_fallback=is_fallback,
        close_call=runner_up is not None and confidence - runner_up_confidence < rule.close_margin,
    )


def close_call(result: RetrievalResult, margin: float) -> bool:
    """True when the runner-up's confidence is within ``margin`` of the winner's."""
    return result.runner_up is not None and result.margin < margin
