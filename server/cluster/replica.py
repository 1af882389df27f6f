"""The model deployment: one engine (model thread, scheduler, expert slots) per Ray Serve replica.

Requests arrive routed by the ingress (task, mode, selection), so a replica loads no encoder. Task
affinity is Ray Serve's model multiplexing with the pattern as the model id: the ingress sends a
request with ``multiplexed_model_id=<task>``, the replica "loads" that id (it keeps the
``tasks_per_replica`` most recent ones: an equal share of the tasks, or as many patterns as its
slots hold at once if more), and Ray Serve's router sends later requests of the task to a replica
that has it, falling back to the replica with the fewest tasks when none has (so the tasks spread
over the replicas, each with a home), and to any replica when those are busy for longer than
``RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S`` (spill-over). The experts themselves are
loaded by the engine when the request runs, as in the single process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from prometheus_client import CollectorRegistry, generate_latest
from ray import serve

from retrieval.service import Route
from server.cluster.state import REPORT_PERIOD_S, ReplicaReport, cluster_state
from server.engine import TaerEngine
from server.engine_api import GenerationOutput, GenerationRequest
from server.loading import ServeConfig, load_engine_parts
from server.metrics import EngineMetrics, MetricFactory

logger = logging.getLogger(__name__)

MODEL_DEPLOYMENT = "TaerModel"


@dataclass(frozen=True, slots=True)
class ReplicaOptions:
    """How each model replica runs. ``max_ongoing_requests`` bounds one replica's queue: a task that
    floods its replica spills over to another once that replica holds this many requests."""

    num_replicas: int = 2
    max_batch_size: int = 16
    scheduler: str = "fifo"
    max_ongoing_requests: int = 16
    tasks_per_replica: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    torch_threads: int | None = None


def model_deployment(options: ReplicaOptions):
    """The model deployment class for ``options`` (the multiplexing capacity is fixed when the class
    is defined, so the class is made here)."""

    @serve.deployment(
        name=MODEL_DEPLOYMENT,
        num_replicas=options.num_replicas,
        max_ongoing_requests=options.max_ongoing_requests,
        ray_actor_options={"num_cpus": options.num_cpus, "num_gpus": options.num_gpus},
        health_check_period_s=2.0,
        health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=5.0,
    )
    class TaerModel:
        async def __init__(self, config: ServeConfig, app_name: str) -> None:
            if options.torch_threads:
                torch.set_num_threads(options.torch_threads)
            self._replica = serve.get_replica_context().replica_id.unique_id
            registry = CollectorRegistry()
            self._registry = registry
            self._served = MetricFactory(registry).counter(
                "replica_requests", "Requests this replica served, by task.", ["task"]
            )
            self._engine = TaerEngine(
                partial(load_engine_parts, config, with_index=False),
                max_batch_size=options.max_batch_size,
                scheduler=options.scheduler,
            )
            await self._engine.start(EngineMetrics(registry))
            await _until_loaded(self._engine)
            self._app_name = app_name
            self._reporter = asyncio.create_task(self._report_forever())
            logger.info("replica %s ready", self._replica)

        async def generate(self, request: GenerationRequest, route: Route) -> AsyncIterator[GenerationOutput]:
            task = serve.get_multiplexed_model_id()
            if task:
                await self._hold_pattern(task)
            self._served.labels(task=route.task or "full").inc()
            async for output in self._engine.generate(request, route):
                if output.routing is not None:
                    output.routing = dataclasses.replace(output.routing, replica=self._replica)
                yield output

        @serve.multiplexed(max_num_models_per_replica=options.tasks_per_replica)
        async def _hold_pattern(self, task: str) -> str:
            # Only tells Ray Serve's router which patterns this replica holds; the engine loads the
            # experts when the request runs, keeping those already resident.
            return task

        async def check_health(self) -> None:
            await self._engine.check_health()

        def report(self) -> ReplicaReport:
            return ReplicaReport(
                replica=self._replica,
                pid=os.getpid(),
                ready=self._engine.is_ready,
                metrics_text=generate_latest(self._registry).decode(),
                describe=_describe(self._engine),
            )

        async def _report_forever(self) -> None:
            state = cluster_state(self._app_name)
            while True:
                try:
                    await state.report.remote(self.report())
                except Exception:  # the state actor restarts or is being replaced: ask again
                    logger.warning("replica %s could not report its state", self._replica, exc_info=True)
                    state = cluster_state(self._app_name)
                await asyncio.sleep(REPORT_PERIOD_S)

        async def __del__(self) -> None:
            self._reporter.cancel()
            await self._engine.shutdown()

    return TaerModel


async def _until_loaded(engine: TaerEngine) -> None:
    """Wait for the engine thread to load the model; a load that failed fails the replica."""
    while not await asyncio.to_thread(engine.wait_ready, 1.0):
        await engine.check_health()  # raises once the load failed


def _describe(engine: TaerEngine) -> dict[str, Any]:
    """The engine's own description, plus which patterns are wholly resident now."""
    description = engine.describe()
    router = engine.parts.router
    resident = {int(layer): set(experts) for layer, experts in description["resident_experts"].items()}
    description["resident_patterns"] = [
        task
        for task in router.task_names
        if all(
            set(experts) <= resident.get(layer, set()) for layer, experts in router.selection(task).items()
        )
    ]
    return description
