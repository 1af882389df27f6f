"""The ingress's engine: retrieval here, generation on a model replica.

:class:`RemoteEngine` implements :class:`~server.engine_api.Engine`, so the ingress serves the single
process's HTTP app unchanged (routes, validation, streaming, errors, API key, metrics). ``generate``
embeds and retrieves once per request (on one thread of its own, never on the event loop), then
streams the outputs of the model deployment's ``generate`` through a Ray Serve handle whose
``multiplexed_model_id`` is the request's task: Ray Serve's router sends it to a replica that
holds that pattern.

Faults: an error a replica raises on purpose (a full queue, say) reaches the client as it would
from the single process; a replica that dies mid-request ends the request with 503 (an error
event in a stream) at once, and Ray Serve restarts the replica.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from ray.exceptions import RayError, RayTaskError

from expert_store.errors import TaerError
from retrieval.service import Route, RouteRequest
from server.cluster.state import REPORT_PERIOD_S, ReplicaReport
from server.engine_api import EngineNotReadyError, GenerationOutput, GenerationRequest, ModelFacts
from server.introspection import PatternIntrospection
from server.loading import RoutingParts

logger = logging.getLogger(__name__)


class RemoteEngine(ModelFacts, PatternIntrospection):
    """``server.engine_api.Engine`` over a model deployment's handle."""

    def __init__(
        self,
        model_handle,
        load: Callable[[], RoutingParts],
        state: Callable[[], Any],
        task_affinity: bool = True,
    ) -> None:
        """``state`` returns the cluster's state actor (asked again after a failure);
        ``task_affinity=False`` leaves the choice of replica to Ray Serve's default router."""
        self._handle = model_handle
        self._task_affinity = task_affinity
        self._load = load
        self._state = state
        self._parts: RoutingParts | None = None
        self._error: BaseException | None = None
        self._reports: list[ReplicaReport] = []
        self._streams: dict[str, Any] = {}
        self._retrieval = ThreadPoolExecutor(1, thread_name_prefix="taer-retrieval")
        self._tasks: list[asyncio.Task] = []

    # Lifecycle ----------------------------------------------------------------------------------

    def load_now(self) -> None:
        """Load retrieval and the tokenizer before serving (the app reads the model's name when it
        is built); otherwise ``start`` loads them on the retrieval thread."""
        self._parts = self._load()

    async def start(self, metrics) -> None:
        self._tasks = [asyncio.create_task(self._watch_replicas())]
        if self._parts is None:
            self._tasks.append(asyncio.create_task(self._load_parts()))

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        for stream in self._streams.values():
            stream.cancel()
        self._retrieval.shutdown(wait=False, cancel_futures=True)

    async def _load_parts(self) -> None:
        try:
            self._parts = await asyncio.get_running_loop().run_in_executor(self._retrieval, self._load)
            logger.info("ingress ready: %s", self._parts.model_name)
        except BaseException as error:
            logger.exception("the ingress could not load retrieval")
            self._error = error

    async def _watch_replicas(self) -> None:
        state = self._state()
        while True:
            try:
                self._reports = await state.fresh_reports.remote()
            except Exception:
                logger.warning("could not read the replicas' reports; asking again", exc_info=True)
                state = self._state()
            await asyncio.sleep(REPORT_PERIOD_S)

    # The contract -------------------------------------------------------------------------------

    @property
    def is_ready(self) -> bool:
        return self._parts is not None and self._error is None and any(r.ready for r in self._reports)

    @property
    def parts(self) -> RoutingParts:
        if self._parts is None:
            raise EngineNotReadyError("the model is still loading")
        return self._parts

    @property
    def reports(self) -> list[ReplicaReport]:
        """The replicas' latest reports (at most ``REPORT_PERIOD_S`` old, plus the actor's delay)."""
        return self._reports

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        if not self.is_ready:
            raise EngineNotReadyError("the model is still loading")
        route = await self._route(request)
        key = affinity_key(route) if self._task_affinity else ""
        handle = self._handle.options(stream=True, multiplexed_model_id=key)
        stream = handle.generate.remote(request, route)
        self._streams[request.request_id] = stream
        unfinished = request.sampling.n
        try:
            async for output in _from_replica(stream):
                yield output
                if output.finished:
                    unfinished -= 1
                    if unfinished == 0:
                        return
            raise EngineNotReadyError("the replica ended the request without finishing it; retry")
        finally:
            self._streams.pop(request.request_id, None)
            if unfinished:
                stream.cancel()

    async def abort(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.cancel()  # the replica's generator is cancelled, which aborts it in its engine

    async def check_health(self) -> None:
        if self._error is not None:
            raise TaerError(f"the ingress could not load retrieval: {self._error}")
        if not any(r.ready for r in self._reports):
            raise TaerError("no model replica has reported in the last seconds")

    def task_names(self) -> list[str]:
        return self.parts.router.task_names

    def describe(self) -> dict[str, Any]:
        parts = self.parts
        router = parts.router
        return {
            "model": parts.model_name,
            "tasks": router.task_names,
            "mode": router.default_mode,
            "budget": router.budget.describe(),
            "slots_per_layer": parts.slots_per_layer,
            "retrieval": "semantic" if router.index is not None else "none (general pattern)",
            "replicas": [
                {"replica": r.replica, "pid": r.pid, "ready": r.ready, **r.describe} for r in self._reports
            ],
        }

    async def _route(self, request: GenerationRequest) -> Route:
        asked = RouteRequest(request.retrieval_text, request.taer.task, request.taer.mode)
        loop = asyncio.get_running_loop()
        routes = await loop.run_in_executor(self._retrieval, self.parts.router.route, [asked])
        return routes[0]


def affinity_key(route: Route) -> str:
    """The multiplexed model id: the pattern's task; empty (no affinity) for the full model."""
    return route.task if route.mode != "full" and route.task else ""


async def _from_replica(stream) -> AsyncIterator[GenerationOutput]:
    """The replica's outputs, with Ray's errors turned into the engine contract's."""
    iterator = stream.__aiter__()
    while True:
        try:
            output = await iterator.__anext__()
        except StopAsyncIteration:
            return
        except RayTaskError as error:  # raised in the replica: a TaerError keeps its meaning
            cause = error.cause
            if isinstance(cause, TaerError):
                raise cause from None
            logger.error("replica failed a request: %s", error)
            raise TaerError("the model replica failed this request; the server log has the details") from None
        except RayError as error:  # the replica died or cannot be reached
            logger.warning("lost the replica serving a request: %s", error)
            raise EngineNotReadyError(
                "the model replica serving this request stopped; it is being restarted, retry"
            ) from None
        yield output


class ReplicaMetricsCollector:
    """Adds every replica's engine metrics to the ingress's registry, labelled ``replica``."""

    def __init__(self, reports: Callable[[], list[ReplicaReport]]) -> None:
        self._reports = reports

    def describe(self) -> list[Metric]:
        return []  # which families exist depends on the replicas' reports

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for report in self._reports():
            for family in text_string_to_metric_families(report.metrics_text):
                target = merged.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                for sample in family.samples:
                    if not sample.name.endswith("_created"):
                        target.add_sample(
                            sample.name, {**sample.labels, "replica": report.replica}, sample.value
                        )
        yield from merged.values()
