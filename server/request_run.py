"""One generation's life at the HTTP layer: admission (``max_queue``), pulling outputs from the
engine with totals and timings for the metrics, and cleaning up exactly once (abort if unfinished,
close the iterator, give the admission slot back)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import anyio

from server.engine_api import (
    Engine,
    EngineNotReadyError,
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    QueueFullError,
    RoutingInfo,
)
from server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


class Admission:
    """Bounds the generation requests in flight at the HTTP layer (``max_queue``)."""

    def __init__(self, limit: int, metrics: ServerMetrics) -> None:
        self._limit = limit
        self._metrics = metrics
        self.num_in_flight = 0

    def acquire(self) -> None:
        if self.num_in_flight >= self._limit:
            raise QueueFullError(
                f"the server already has {self.num_in_flight} requests in flight (max_queue); retry later"
            )
        self.num_in_flight += 1
        self._metrics.set_in_flight(self.num_in_flight)

    def release(self) -> None:
        self.num_in_flight -= 1
        self._metrics.set_in_flight(self.num_in_flight)


@dataclass(slots=True)
class Completion:
    """A finished generation, gathered for a non-streaming response."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    stop_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    routing: RoutingInfo | None


class RequestRun:
    """One admitted generation: pulls outputs from the engine, keeps totals and timings, and cleans
    up exactly once (abort if unfinished, close the iterator, free the admission slot)."""

    def __init__(
        self, engine: Engine, request: GenerationRequest, metrics: ServerMetrics, admission: Admission
    ) -> None:
        self.request = request
        self.routing: RoutingInfo | None = None
        self.prompt_tokens = len(request.prompt_token_ids)
        self.completion_tokens = 0
        self.finish_reason: FinishReason | None = None
        self.stop_reason: str | None = None
        self._engine = engine
        self._metrics = metrics
        self._admission = admission
        self._outputs = engine.generate(request)
        self._last_token_time: float | None = None
        self._closed = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    async def next_output(self) -> GenerationOutput:
        """The engine's next output. An engine-side abort becomes :class:`EngineNotReadyError`."""
        try:
            output = await anext(self._outputs)
        except StopAsyncIteration:
            output = GenerationOutput(self.request.request_id, finished=True, finish_reason="abort")
            logger.error("engine ended request %s without a finished output", self.request.request_id)
        self._observe(output)
        if output.finish_reason == "abort":
            raise EngineNotReadyError("the engine aborted this request before it finished; retry")
        return output

    async def collect(self) -> Completion:
        texts: list[str] = []
        token_ids: list[int] = []
        while not self.finished:
            output = await self.next_output()
            texts.append(output.text)
            token_ids.extend(output.token_ids)
        assert self.finish_reason is not None
        return Completion(
            text="".join(texts),
            token_ids=token_ids,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            routing=self.routing,
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Shielded: this runs while a disconnect cancels the stream, and the abort must still happen.
        with anyio.CancelScope(shield=True):
            try:
                if not self.finished:
                    await self._engine.abort(self.request.request_id)
                aclose = getattr(self._outputs, "aclose", None)
                if aclose is not None:
                    await aclose()
            except Exception:
                logger.exception("cleaning up request %s failed", self.request.request_id)
            finally:
                self._admission.release()
                if self.finished:
                    self._metrics.observe_e2e_latency(time.monotonic() - self.request.arrival_time)

    def _observe(self, output: GenerationOutput) -> None:
        if self.routing is None and output.routing is not None:
            self.routing = output.routing
            self._metrics.record_routed(output.routing.task, output.routing.mode)
        num_tokens = len(output.token_ids)
        if num_tokens:
            now = time.monotonic()
            if self._last_token_time is None:
                self._metrics.observe_time_to_first_token(now - self.request.arrival_time)
            else:
                for _ in range(num_tokens):
                    self._metrics.observe_inter_token_latency((now - self._last_token_time) / num_tokens)
            self._last_token_time = now
            self._metrics.record_generation_tokens(num_tokens)
        self.prompt_tokens = output.prompt_tokens or self.prompt_tokens
        self.completion_tokens = output.completion_tokens or self.completion_tokens + num_tokens
        if output.finished:
            self.finish_reason = output.finish_reason or "stop"
            self.stop_reason = output.stop_reason
