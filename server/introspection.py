"""What an engine shows beyond ``describe()``: every pattern's TCESS table, and where a prompt would
go without running it (a dry-run route: the task, the vote behind it, the experts it would load).

:class:`PatternIntrospection` implements both parts of the engine contract for any engine that holds
a :class:`~retrieval.service.PatternRouter` as ``self.parts.router`` and says in ``describe()`` what
is resident: the single process's engine (its own slots) and a cluster's ingress (each replica's
slots, from their reports) share it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from expert_store.modes import Mode
from retrieval.overview import PatternTables, pattern_tables
from retrieval.service import Route, RouteExplanation, RouteRequest
from server.engine_api import TaerOptions

MAX_EXAMPLE_CHARS = 300  # of a stored example's text in a preview

RetrievalKind = Literal["semantic", "forced", "full", "none"]
"""How a preview's task was chosen: by the index, by the client (``taer.task``), not at all (the
full model), or by default (no index: the ``general`` pattern)."""


@dataclass(frozen=True, slots=True)
class StoredExample:
    """A stored text near the prompt: its task, the similarity the vote weighed (in the task space
    when the index has one) and the encoder's own cosine."""

    task: str
    text: str
    similarity: float
    cosine: float


@dataclass(frozen=True, slots=True)
class RoutePreview:
    """Where a prompt would go, decided as a real request's route is, with nothing generated or loaded.

    ``task``, ``mode``, ``similarity`` and ``confidence`` are what the response's ``taer`` field
    would say. ``candidate`` is the vote's winner (``task`` differs when the vote was not trusted
    and ``general`` serves: ``is_fallback``), ``runner_up`` the second task. ``neighbours`` are the
    stored examples that voted, nearest first. ``experts`` is the pattern's retained set per decoder
    layer (the prefetch hint in exact mode; ``None`` for the full model), ``experts_to_load`` those
    of them not resident now, ``num_*`` their totals. ``replica``: in a cluster, the replica whose
    slots the comparison used (one holding the pattern, else the one with the fewest to load).
    """

    task: str | None
    mode: Mode
    retrieval: RetrievalKind
    similarity: float | None = None
    confidence: float | None = None
    candidate: str | None = None
    runner_up: str | None = None
    is_fallback: bool = False
    neighbours: tuple[StoredExample, ...] = ()
    experts: dict[int, list[int]] | None = None
    experts_to_load: dict[int, list[int]] | None = None
    num_experts: int = 0
    num_to_load: int = 0
    replica: str | None = None


class PatternIntrospection:
    """The contract's ``pattern_tables`` and ``preview_route`` over ``self.parts.router``."""

    parts: Any  # and ``describe()``, as the engine contract has it

    def pattern_tables(self) -> PatternTables:
        return pattern_tables(self.parts.router)

    async def preview_route(self, text: str, options: TaerOptions) -> RoutePreview:
        router = self.parts.router
        asked = RouteRequest(text, options.task, options.mode)
        # Off the event loop, like a real request's retrieval (the encoder and FAISS are read-only).
        (explanation,) = await asyncio.to_thread(router.explain, [asked])
        resident, replica = resident_for(self.describe(), explanation.route)  # type: ignore[attr-defined]
        texts = router.index.texts if router.index is not None else []
        return preview(explanation, texts, resident, replica, forced=options.task is not None)


def preview(
    explanation: RouteExplanation,
    texts: list[str],
    resident: Mapping[int, set[int]],
    replica: str | None = None,
    *,
    forced: bool = False,
) -> RoutePreview:
    """The preview of ``explanation`` against ``resident`` (decoder layer -> resident expert ids);
    ``texts``: the index's stored texts, by id."""
    route, result = explanation.route, explanation.retrieval
    experts = to_load = None
    if route.selection is not None:
        experts = {layer: list(ids) for layer, ids in route.selection.items()}
        to_load = {
            layer: [e for e in ids if e not in resident.get(layer, ())] for layer, ids in experts.items()
        }
    kind: RetrievalKind = (
        "full" if route.mode == "full" else "forced" if forced else "semantic" if result else "none"
    )
    neighbours = ()
    if result is not None:
        neighbours = tuple(
            StoredExample(n.task, texts[n.text_id][:MAX_EXAMPLE_CHARS], n.similarity, n.encoder_cosine)
            for n in result.neighbours
        )
    return RoutePreview(
        task=route.task,
        mode=route.mode,
        retrieval=kind,
        similarity=route.similarity,
        confidence=route.confidence,
        candidate=result.candidate if result else None,
        runner_up=result.runner_up if result else None,
        is_fallback=result.is_fallback if result else False,
        neighbours=neighbours,
        experts=experts,
        experts_to_load=to_load,
        num_experts=sum(map(len, (experts or {}).values())),
        num_to_load=sum(map(len, (to_load or {}).values())),
        replica=replica,
    )


def resident_for(description: Mapping[str, Any], route: Route) -> tuple[dict[int, set[int]], str | None]:
    """The resident experts ``route`` would meet, from an engine's ``describe()``: its own, or in a
    cluster the replica's that holds the route's pattern, else the one with the fewest to load."""
    if "resident_experts" in description:
        return _resident(description["resident_experts"]), None
    replicas = [r for r in description.get("replicas", ()) if r.get("ready") and "resident_experts" in r]
    if not replicas:
        return {}, None
    selection = route.selection or {}

    def missing(replica: Mapping[str, Any]) -> int:
        resident = _resident(replica["resident_experts"])
        return sum(e not in resident.get(layer, ()) for layer, ids in selection.items() for e in ids)

    best = min(replicas, key=lambda r: (route.task not in r.get("resident_patterns", ()), missing(r)))
    return _resident(best["resident_experts"]), best.get("replica")


def _resident(by_layer: Mapping[str, list[int]]) -> dict[int, set[int]]:
    return {int(layer): set(experts) for layer, experts in by_layer.items()}
