"""What the three serving objects (chat, completions, TGI) share: sampling parameters with their
precedence and the context check, running a generation against the deadline and client
disconnects, and server-sent events.

A serving object turns an HTTP request into a :class:`GenerationRequest` and engine outputs into a
response; the routes in ``app.py`` only call it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from expert_store.errors import RequestError, UnknownTaskError
from server.engine_api import (
    Engine,
    GenerationOutput,
    GenerationRequest,
    RoutingInfo,
    SamplingParams,
    TaerOptions,
)
from server.errors import ClientDisconnectedError, to_api_error
from server.metrics import ServerMetrics
from server.protocol import TaerRequest
from server.request_run import Admission, Completion, RequestRun
from server.settings import ServerSettings

T = TypeVar("T")
SSE_DONE = b"data: [DONE]\n\n"


@dataclass(slots=True)
class RequestedSampling:
    """Sampling fields as the client sent them (``None``: not sent). ``names`` maps the engine's
    field names to the client's (``max_tokens`` -> ``parameters.max_new_tokens``) for errors."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    prompt_param: str = "prompt"
    names: dict[str, str] = field(default_factory=dict)

    def name(self, engine_field: str) -> str:
        return self.names.get(engine_field, engine_field)


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


@dataclass(slots=True)
class ServingContext:
    """What every serving object is built from (kept on ``app.state``)."""

    engine: Engine
    settings: ServerSettings
    metrics: ServerMetrics
    admission: Admission


class ServingBase:
    """Shared steps of the chat, completions and TGI serving objects."""

    def __init__(self, context: ServingContext) -> None:
        self.engine = context.engine
        self.settings = context.settings
        self.metrics = context.metrics
        self.admission = context.admission

    @property
    def served_model_name(self) -> str:
        return self.settings.model_name or self.engine.model_name

    def check_model(self, name: str | None) -> None:
        if name is None or name in (self.served_model_name, self.engine.model_name):
            return
        raise RequestError(
            f"model {name!r} is not served here; this server serves {self.served_model_name!r}",
            param="model",
            status=404,
        )

    def taer_options(self, taer: TaerRequest | None) -> TaerOptions:
        options = taer.to_options() if taer is not None else TaerOptions()
        if options.task is not None and options.task not in self.engine.task_names():
            known = ", ".join(sorted(self.engine.task_names())) or "none"
            raise UnknownTaskError(f"unknown task {options.task!r}; this server has patterns for: {known}")
        return options

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        return list(self.engine.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def sampling_params(
        self, asked: RequestedSampling, prompt_len: int, api_max_tokens: int | None
    ) -> SamplingParams:
        """Request value, then server default, then API default; ``max_tokens`` must fit the context.

        A ``max_tokens`` the client asked for that does not fit is an error; a default that does
        not fit is cut to what is left of the context.
        """
        if prompt_len == 0:
            raise RequestError(f"the {asked.prompt_param} is empty; send some text", param=asked.prompt_param)
        context = self.engine.max_model_len
        room = context - prompt_len
        if room < 1:
            raise RequestError(
                f"the prompt is {prompt_len} tokens, which leaves no room in this model's context of "
                f"{context} tokens; shorten the {asked.prompt_param}",
                param=asked.prompt_param,
            )
        if asked.max_tokens is not None and asked.max_tokens > room:
            name = asked.name("max_tokens")
            raise RequestError(
                f"{name} = {asked.max_tokens} plus the {prompt_len}-token prompt exceeds this model's "
                f"context of {context} tokens; ask for at most {room}",
                param=name,
            )
        defaults = self.settings.defaults
        default_max_tokens = _first_set(defaults.max_tokens, api_max_tokens, room)
        top_k = _first_set(asked.top_k, defaults.top_k, 0)
        try:
            return SamplingParams(
                max_tokens=_first_set(asked.max_tokens, min(default_max_tokens, room)),
                temperature=_first_set(asked.temperature, defaults.temperature, 1.0),
                top_p=_first_set(asked.top_p, defaults.top_p, 1.0),
                top_k=0 if top_k == -1 else top_k,
                seed=asked.seed,
                stop=asked.stop,
                repetition_penalty=_first_set(asked.repetition_penalty, defaults.repetition_penalty, 1.0),
                ignore_eos=asked.ignore_eos,
            )
        except RequestError as error:
            error.param = asked.name(error.param or "")
            raise

    def start_run(self, request: GenerationRequest) -> RequestRun:
        self.admission.acquire()
        self.metrics.record_prompt_tokens(len(request.prompt_token_ids))
        return RequestRun(self.engine, request, self.metrics, self.admission)

    async def complete(self, request: GenerationRequest, raw: Request) -> Completion:
        """Generate to the end, aborting if the client disconnects or the deadline passes."""
        run = self.start_run(request)
        try:
            return await self._until_done_or_gone(run.collect(), raw, self.settings.request_timeout_s)
        finally:
            await run.close()

    async def start_stream(
        self, request: GenerationRequest, raw: Request
    ) -> tuple[RequestRun, GenerationOutput]:
        """Admit and wait for the first output, so that queue-full, unknown-task and other early
        errors are plain HTTP errors and the routing headers can be sent with the stream."""
        run = self.start_run(request)
        try:
            first = await self._until_done_or_gone(run.next_output(), raw, self.settings.request_timeout_s)
        except BaseException:
            await run.close()
            raise
        return run, first

    async def next_output(self, run: RequestRun) -> GenerationOutput:
        """The run's next output within the request's deadline."""
        timeout = self.settings.request_timeout_s
        if timeout is None:
            return await run.next_output()
        remaining = run.request.arrival_time + timeout - time.monotonic()
        try:
            return await asyncio.wait_for(run.next_output(), max(remaining, 0.0))
        except asyncio.TimeoutError:
            raise self._timeout_error() from None

    def sse_response(
        self, run: RequestRun, first: GenerationOutput, renderer: StreamRenderer, *, done_marker: bool
    ) -> SSEResponse:
        headers = {"cache-control": "no-cache", "x-accel-buffering": "no", **routing_headers(run.routing)}
        return SSEResponse(self._events(run, first, renderer, done_marker), headers=headers)

    async def _events(
        self, run: RequestRun, first: GenerationOutput, renderer: StreamRenderer, done_marker: bool
    ) -> AsyncIterator[bytes]:
        try:
            for event in renderer.opening(run):
                yield event
            output = first
            while True:
                for event in renderer.delta(run, output):
                    yield event
                if run.finished:
                    break
                output = await self.next_output(run)
            for event in renderer.closing(run):
                yield event
        except Exception as exc:
            # The status line is gone already: the error travels as one event.
            yield to_api_error(exc).to_sse()
        finally:
            await run.close()
        if done_marker:
            yield SSE_DONE

    async def _until_done_or_gone(self, work: Awaitable[T], raw: Request, timeout: float | None) -> T:
        work_task = asyncio.ensure_future(work)
        watch_task = asyncio.ensure_future(_wait_for_disconnect(raw))
        try:
            done, _ = await asyncio.wait(
                {work_task, watch_task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            watch_task.cancel()
            if not work_task.done():
                work_task.cancel()
                await asyncio.wait({work_task})  # the engine iterator must be idle before run.close()
        if work_task in done:
            return work_task.result()
        if watch_task in done:
            raise ClientDisconnectedError()
        raise self._timeout_error()

    def _timeout_error(self) -> RequestError:
        return RequestError(
            f"the request did not finish within {self.settings.request_timeout_s:g} s "
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
    }
    return {name: value for name, value in values.items() if value is not None}


def sse_event(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def stop_tuple(stop: list[str] | None) -> tuple[str, ...]:
    """The API's ``stop`` (already a list or nothing, see ``protocol``) as the engine's tuple."""
    return () if stop is None else tuple(stop)


def _first_set(*values: T | None) -> T:
    for value in values:
        if value is not None:
            return value
    raise AssertionError("the last value is the API default and is never None")
