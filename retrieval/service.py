"""From a request to the experts that serve it: retrieve the task, select its retained set.

``PatternRouter`` composes the task index (semantic retrieval, optional), the pattern set and a
budget. It knows nothing of HTTP: the engine calls ``route`` with the request texts and the
client's choices, and gets back the task, the mode and the selection in decoder-layer terms.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

from expert_store.errors import RequestError, UnknownTaskError
from expert_store.modes import FALLBACKS, Fallback, Mode
from retrieval.index import TaskIndex
from retrieval.patterns import PatternSet
from retrieval.router_check import MAX_WRONGLY_REROUTED, RouterCheck, RouterProfile, Verdict
from retrieval.selection import Budget, Selection, merge, select
from retrieval.tasks_file import GENERAL
from retrieval.vote import RetrievalResult

logger = logging.getLogger(__name__)

LayerSelection = dict[int, tuple[int, ...]]  # decoder layer -> expert ids, best first


@dataclass(frozen=True, slots=True)
class Route:
    """How one request is served. ``selection`` is None in full mode. ``check`` is the router
    check's verdict once the prefill ran it (``task`` and ``mode`` then follow the verdict)."""

    task: str | None
    mode: Mode
    selection: LayerSelection | None
    similarity: float | None = None
    confidence: float | None = None
    retrieval_seconds: float = 0.0
    check: Verdict | None = None


@dataclass(frozen=True, slots=True)
class RouteExplanation:
    """A route and the retrieval that chose it (``None`` when none ran: a forced task, the full
    model, or no index)."""

    route: Route
    retrieval: RetrievalResult | None = None


@dataclass(frozen=True, slots=True)
class RouteRequest:
    text: str
    task: str | None = None
    mode: Mode | None = None


class PatternRouter:
    """Retrieval + selection under one budget, with a selection cache per task."""

    def __init__(
        self,
        patterns: PatternSet,
        budget: Budget,
        index: TaskIndex | None = None,
        default_mode: Mode = "pruned",
        adaptive: bool = False,
        merge_close_calls: bool = False,
        k: int = 8,
        fallback: Fallback = "general",
    ) -> None:
        """``fallback``: what serves a pruned-mode query like nothing stored (the vote's fallback):
        the general pattern, exact mode (the model's own routing, the general pattern as prefetch
        hint) or the full model."""
        if fallback not in FALLBACKS:
            raise ValueError(f"unknown fallback {fallback!r}; use one of {', '.join(FALLBACKS)}")
        self.patterns = patterns
        self.budget = budget
        self.index = index
        self.default_mode = default_mode
        self.adaptive = adaptive
        self.merge_close_calls = merge_close_calls
        self.k = k
        self.fallback = fallback
        self.moe_layers: list[int] = list(patterns.metadata.get("moe_layers", []))
        self._selection = lru_cache(maxsize=256)(self._select)
        self.check: RouterCheck | None = None
        # One query at a time: a fast tokenizer called from two threads at once can fail ("Already
        # borrowed"), and a dry run (server/introspection.py) may query beside the retrieval thread.
        self._query_lock = threading.Lock()

    @property
    def task_names(self) -> list[str]:
        return [*self.patterns.tasks, GENERAL]

    def route(self, requests: Sequence[RouteRequest]) -> list[Route]:
        """One route per request; the texts that need retrieval are embedded together."""
        return [explanation.route for explanation in self.explain(requests)]

    def explain(self, requests: Sequence[RouteRequest]) -> list[RouteExplanation]:
        """:meth:`route`, with the retrieval result behind each route (its neighbours and vote)."""
        to_retrieve = [
            i for i, r in enumerate(requests) if r.task is None and (r.mode or self.default_mode) != "full"
        ]
        retrieved = {}
        seconds = 0.0
        if to_retrieve and self.index is not None:
            start = time.perf_counter()
            with self._query_lock:
                results = self.index.query([requests[i].text for i in to_retrieve], k=self.k)
            seconds = (time.perf_counter() - start) / len(to_retrieve)
            retrieved = dict(zip(to_retrieve, results, strict=True))
        return [self._decide(request, retrieved.get(i), seconds) for i, request in enumerate(requests)]

    def _decide(
        self, request: RouteRequest, result: RetrievalResult | None, seconds: float
    ) -> RouteExplanation:
        mode = request.mode or self.default_mode
        if mode == "full":
            return RouteExplanation(Route(None, "full", None))
        if request.task is not None:
            return RouteExplanation(Route(request.task, mode, self.selection(request.task)))
        if result is None:  # no index: the general pattern serves everything
            return RouteExplanation(Route(GENERAL, mode, self.selection(GENERAL), None, None))
        if result.is_fallback and mode == "pruned" and self.fallback != "general":
            selection = self.selection(GENERAL) if self.fallback == "exact" else None  # a prefetch hint
            task = GENERAL if self.fallback == "exact" else None
            route = Route(task, self.fallback, selection, result.similarity, result.confidence, seconds)
            return RouteExplanation(route, result)
        key = result.task
        if self.merge_close_calls and result.close_call and result.runner_up and not result.is_fallback:
            key = f"{result.task}+{result.runner_up}"
        route = Route(result.task, mode, self.selection(key), result.similarity, result.confidence, seconds)
        return RouteExplanation(route, result)

    def enable_check(self, profile: RouterProfile) -> RouterCheck:
        """Turn the router check on, fitted on ``profile`` with this budget's retained sets; it stays
        off (``self.check`` None) where validation shows that the model's routing does not tell the
        tasks apart. Returns the fitted check either way."""
        selections = {task: self.selection(task) for task in self.patterns.tasks}
        check = RouterCheck.calibrated(profile, selections, self.moe_layers)
        thresholds = check.thresholds
        found = (
            f"on the {thresholds.validated_on} the prompt's own routing names the right task for "
            f"{100 * thresholds.router_accuracy:.1f}% and the check would re-route "
            f"{100 * thresholds.wrongly_rerouted:.1f}% of right retrievals"
        )
        if not thresholds.separates:
            logger.warning("router check off: %s (it acts up to %.0f%%)", found, 100 * MAX_WRONGLY_REROUTED)
            self.check = None
            return check
        self.check = check
        logger.info(
            "router check on (%s): re-route when another task fits the prompt's own routing better "
            "by more than %.3f",
            found,
            thresholds.margin,
        )
        return check

    def checks(self, route: Route) -> bool:
        """Whether the router check looks at ``route``: a retrieved task's pattern in pruned mode,
        not yet checked (a task the client forced, the full model and the fallback are not)."""
        return (
            self.check is not None
            and route.check is None
            and route.mode == "pruned"
            and route.similarity is not None
            and route.task in self.check.tasks
        )

    def follow(self, route: Route, verdict: Verdict) -> Route:
        """``route`` after the router check: the same route if kept; else the checked task's
        pattern, in pruned mode or (no pattern covers the prompt well) as exact mode's prefetch hint."""
        if verdict.action == "kept":
            return replace(route, check=verdict)
        mode: Mode = "pruned" if verdict.action == "rerouted" else "exact"
        return replace(
            route, task=verdict.checked, mode=mode, selection=self.selection(verdict.checked), check=verdict
        )

    def selection(self, task: str) -> LayerSelection:
        """The retained experts of ``task`` ("a+b" merges two tasks' TCESS) in decoder-layer terms."""
        for name in task.split("+"):
            if name not in self.task_names:
                raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(self.task_names)}")
        return self._selection(task)

    def _select(self, task: str) -> LayerSelection:
        names = task.split("+")
        if len(names) == 1:
            chosen = self.patterns.select(task, self.budget, adaptive=self.adaptive)
        else:
            a, b = (self.patterns.get(n).stats for n in names)
            scores = merge(a.tcess, b.tcess, 0.5)
            chosen = select(
                scores,
                self.budget,
                top_k=a.top_k,
                always_keep=self.patterns.required_experts(),
                adaptive=self.adaptive,
                tiebreak=merge(a.mean_prob, b.mean_prob, 0.5),
            )
        return to_layers(chosen, self.moe_layers)


def to_layers(selection: Selection, moe_layers: Sequence[int]) -> LayerSelection:
    """Rows (MoE layers in order) -> decoder layer indices."""
    if len(selection.layers) != len(moe_layers):
        raise RequestError(
            f"a selection of {len(selection.layers)} layers does not fit {len(moe_layers)} MoE layers"
        )
    return {moe_layers[row]: tuple(selection.experts(row)) for row in selection.layers}
