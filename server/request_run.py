"""One generation's whole life at the HTTP layer, in one object.

:class:`RequestRun` is admitted when it is made (``max_queue``), pulls the engine's outputs within
the request's deadline while watching for the client to go away, gathers them into one
:class:`Completion` or turns them into server-sent events, keeps the metrics (time to first token,
inter-token latency, end-to-end latency, routing) and cleans up exactly once: abort if unfinished,
close the engine's iterator, give the admission slot back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from expert_store.errors import RequestError
from server.engine_api import (
    Engine,
    EngineNotReadyError,
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    QueueFullError,
    RoutingInfo,
    TokenLogprob,
)
from server.errors import ClientDisconnectedError, to_api_error
from server.metrics import ServerMetrics
from server.recent import RecentRequests
from server.settings import ServerSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")
SSE_DONE = b"data: [DONE]\n\n"


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
class ServingContext:
    """What every serving object and run is built from (kept on ``app.state``)."""

    engine: Engine
    settings: ServerSettings
    metrics: ServerMetrics
    admission: Admission
    recent: RecentRequests = field(default_factory=RecentRequests)


@dataclass(slots=True)
class Choice:
    """One sample of a generation, as far as it has come (``finish_reason``: ``None`` until done)."""

    index: int
    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    completion_tokens: int = 0
    finish_reason: FinishReason | None = None
    stop_reason: str | None = None
    last_token_time: float | None = None  # time.monotonic() of its last token

    @property
    def text(self) -> str:
        return "".join(self.texts)


@dataclass(slots=True)
class Completion:
    """A finished generation, gathered for a non-streaming response: its samples, in order."""

    choices: list[Choice]
    prompt_tokens: int
    completion_tokens: int
    routing: RoutingInfo | None


class StreamRenderer(Protocol):
    """Turns one run's outputs into server-sent events, in one API's shape."""

    def opening(self, run: RequestRun) -> list[bytes]: ...

    def delta(self, run: RequestRun, output: GenerationOutput) -> list[bytes]: ...

    def closing(self, run: RequestRun) -> list[bytes]: ...


class SSEResponse(StreamingResponse):
    """A stream of server-sent events whose generator is always closed when the response ends, so
    an unfinished generation is aborted at once when the client goes away, not at garbage
    collection."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()


class RequestRun:
    """One admitted generation, from admission to cleanup. Use :meth:`complete` or :meth:`stream`
    once; either cleans up when the generation ends, fails, times out or loses its client."""

    def __init__(self, context: ServingContext, request: GenerationRequest, raw: Request) -> None:
        context.admission.acquire()  # QueueFullError before anything else happens
        context.metrics.record_prompt_tokens(len(request.prompt_token_ids))
        self.request = request
        self.routing: RoutingInfo | None = None
        self.prompt_tokens = len(request.prompt_token_ids)
        self.choices = [Choice(index) for index in range(request.sampling.n)]
        self._context = context
        self._metrics = context.metrics
        self._raw = raw
        self._timeout = context.settings.request_timeout_s
        self._outputs = context.engine.generate(request)
        self._closed = False

    @property
    def finished(self) -> bool:
        """Every sample has finished."""
        return all(choice.finish_reason is not None for choice in self.choices)

    @property
    def completion_tokens(self) -> int:
        return sum(choice.completion_tokens for choice in self.choices)

    @property
    def finish_reason(self) -> FinishReason | None:
        """The first sample's (the only one unless ``n > 1``)."""
        return self.choices[0].finish_reason

    @property
    def stop_reason(self) -> str | None:
        return self.choices[0].stop_reason

    async def complete(self) -> Completion:
        """Generate to the end, aborting if the client disconnects or the deadline passes."""
        try:
            return await self._until_done_or_gone(self._collect())
        finally:
            await self.close()

    async def stream(self, renderer: StreamRenderer, *, done_marker: bool) -> SSEResponse:
        """Wait for the first output, so that queue-full, unknown-task and other early errors are
        plain HTTP errors and the routing headers go out with the stream; then stream the rest."""
        try:
            first = await self._until_done_or_gone(self._next_output())
        except BaseException:
            await self.close()
            raise
        headers = {"cache-control": "no-cache", "x-accel-buffering": "no", **routing_headers(self.routing)}
        return SSEResponse(self._events(first, renderer, done_marker), headers=headers)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Shielded: this runs while a disconnect cancels the stream, and the abort must still happen.
        with anyio.CancelScope(shield=True):
            try:
                if not self.finished:
                    await self._context.engine.abort(self.request.request_id)
                aclose = getattr(self._outputs, "aclose", None)
                if aclose is not None:
                    await aclose()
            except Exception:
                logger.exception("cleaning up request %s failed", self.request.request_id)
            finally:
                self._context.admission.release()
                self._context.recent.record(self)
                if self.finished:
                    self._metrics.observe_e2e_latency(time.monotonic() - self.request.arrival_time)

    async def _events(
        self, first: GenerationOutput, renderer: StreamRenderer, done_marker: bool
    ) -> AsyncIterator[bytes]:
        try:
            for event in renderer.opening(self):
                yield event
            output = first
            while True:
                for event in renderer.delta(self, output):
                    yield event
                if self.finished:
                    break
                output = await self._next_within_deadline()
            for event in renderer.closing(self):
                yield event
        except Exception as exc:
            # The status line is gone already: the error travels as one event.
            yield to_api_error(exc).to_sse()
        finally:
            await self.close()
        if done_marker:
            yield SSE_DONE

    async def _next_within_deadline(self) -> GenerationOutput:
        if self._timeout is None:
            return await self._next_output()
        remaining = self.request.arrival_time + self._timeout - time.monotonic()
        try:
            return await asyncio.wait_for(self._next_output(), max(remaining, 0.0))
        except asyncio.TimeoutError:
            raise self._timeout_error() from None

    async def _until_done_or_gone(self, work: Awaitable[T]) -> T:
        work_task = asyncio.ensure_future(work)
        watch_task = asyncio.ensure_future(_wait_for_disconnect(self._raw))
        try:
            done, _ = await asyncio.wait(
                {work_task, watch_task}, timeout=self._timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            watch_task.cancel()
            if not work_task.done():
                work_task.cancel()
                await asyncio.wait({work_task})  # the engine iterator must be idle before close()
        if work_task in done:
            return work_task.result()
        if watch_task in done:
            raise ClientDisconnectedError()
        raise self._timeout_error()

    async def _next_output(self) -> GenerationOutput:
        """The engine's next output. An engine-side abort becomes :class:`EngineNotReadyError`."""
        try:
            output = await anext(self._outputs)
        except StopAsyncIteration:
            unfinished = next(c.index for c in self.choices if c.finish_reason is None)
            output = GenerationOutput(
                self.request.request_id, finished=True, finish_reason="abort", index=unfinished
            )
            logger.error("engine ended request %s without a finished output", self.request.request_id)
        self._observe(output)
        if output.finish_reason == "abort":
            raise EngineNotReadyError("the engine aborted this request before it finished; retry")
        return output

    async def _collect(self) -> Completion:
        while not self.finished:
            output = await self._next_output()
            choice = self.choices[output.index]
            choice.texts.append(output.text)
            choice.token_ids.extend(output.token_ids)
            if output.logprobs is not None:
                choice.logprobs = choice.logprobs or []
                choice.logprobs.extend(output.logprobs)
            if output.prompt_logprobs is not None:
                choice.prompt_logprobs = output.prompt_logprobs
        return Completion(
            choices=self.choices,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            routing=self.routing,
        )

    def _observe(self, output: GenerationOutput) -> None:
        if self.routing is None and output.routing is not None:
            self.routing = output.routing
            self._metrics.record_routed(output.routing.task, output.routing.mode)
        if not 0 <= output.index < len(self.choices):
            raise AssertionError(
                f"the engine sent sample {output.index} of a request with n={len(self.choices)}"
            )
        choice = self.choices[output.index]
        num_tokens = len(output.token_ids)
        if num_tokens:
            now = time.monotonic()
            if all(c.last_token_time is None for c in self.choices):
                self._metrics.observe_time_to_first_token(now - self.request.arrival_time)
            if choice.last_token_time is not None:  # the gaps are each sample's own
                for _ in range(num_tokens):
                    self._metrics.observe_inter_token_latency((now - choice.last_token_time) / num_tokens)
            choice.last_token_time = now
            self._metrics.record_generation_tokens(num_tokens)
        self.prompt_tokens = output.prompt_tokens or self.prompt_tokens
        choice.completion_tokens = output.completion_tokens or choice.completion_tokens + num_tokens
        if output.finished:
            choice.finish_reason = output.finish_reason or "stop"
            choice.stop_reason = output.stop_reason

    def _timeout_error(self) -> RequestError:
        return RequestError(
            f"the request did not finish within {self._timeout:g} s "
            "(the server's request timeout) and was aborted",
            status=504,
        )


async def _wait_for_disconnect(raw: Request) -> None:
    # Called once the body has been read: the next message can only be the disconnect.
    while (await raw.receive())["type"] != "http.disconnect":
        pass


def routing_headers(routing: RoutingInfo | None) -> dict[str, str]:
    """The ``x-taer-*`` response headers (a field that is ``None`` is left out)."""
    if routing is None:
        return {}
    values = {
        "x-taer-task": routing.task,
        "x-taer-similarity": None if routing.similarity is None else f"{routing.similarity:.4f}",
        "x-taer-confidence": None if routing.confidence is None else f"{routing.confidence:.4f}",
        "x-taer-mode": routing.mode,
        "x-taer-experts-loaded": str(routing.experts_loaded),
        "x-taer-replica": routing.replica,
        "x-taer-retrieved-task": routing.retrieved_task,
        "x-taer-checked-task": routing.checked_task,
        "x-taer-rerouted": None if routing.rerouted is None else str(routing.rerouted).lower(),
    }
    return {name: value for name, value in values.items() if value is not None}


def sse_event(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
