"""Server-sent events in the OpenAI shapes: ``chat.completion.chunk`` and streamed
``text_completion`` chunks, one renderer per stream (see :class:`~server.request_run.StreamRenderer`)."""

from __future__ import annotations

import time
from collections.abc import Callable

from pydantic import BaseModel

from server.engine_api import GenerationOutput, GenerationRequest
from server.request_run import RequestRun, sse_event
from server.responses import (
    ChatChunkChoice,
    ChatCompletionChunk,
    CompletionChoice,
    CompletionResponse,
    Usage,
    to_json,
)
from server.serving_logprobs import TokenTexts, chat_logprobs, completion_logprobs


class OpenAIStream:
    """What both OpenAI streams share: the model, one creation time, and whether usage is sent."""

    def __init__(self, model: str, texts: TokenTexts, *, include_usage: bool) -> None:
        self._model = model
        self._texts = texts
        self._include_usage = include_usage
        self._created = int(time.time())

    def _sse(self, chunk: BaseModel) -> bytes:
        omit = ("taer",) if self._include_usage else ("taer", "usage")
        return sse_event(to_json(chunk, omit_if_none=omit))


class ChatStream(OpenAIStream):
    """``chat.completion.chunk`` events: each choice's role, its content deltas (with their log
    probabilities when asked for) and its finish reason; then usage if asked."""

    def opening(self, run: RequestRun) -> list[bytes]:
        events = []
        for choice in run.choices:
            role = self._chunk(run, choice.index, {"role": "assistant", "content": ""})
            if choice.index == 0:
                role.taer = run.routing
            events.append(self._sse(role))
        return events

    def delta(self, run: RequestRun, output: GenerationOutput) -> list[bytes]:
        events = []
        if output.text or output.logprobs:
            chunk = self._chunk(run, output.index, {"content": output.text})
            if output.logprobs:
                chunk.choices[0].logprobs = chat_logprobs(output.logprobs, self._texts)
            events.append(self._sse(chunk))
        if output.finished:
            reason = run.choices[output.index].finish_reason
            events.append(self._sse(self._chunk(run, output.index, {}, finish_reason=reason)))
        return events

    def closing(self, run: RequestRun) -> list[bytes]:
        if not self._include_usage:
            return []
        usage = ChatCompletionChunk(
            id=run.request.request_id,
            created=self._created,
            model=self._model,
            choices=[],
            usage=Usage.of(run.prompt_tokens, run.completion_tokens),
        )
        return [self._sse(usage)]

    def _chunk(
        self, run: RequestRun, index: int, delta: dict[str, str], finish_reason: str | None = None
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=run.request.request_id,
            created=self._created,
            model=self._model,
            choices=[ChatChunkChoice(index=index, delta=delta, finish_reason=finish_reason)],
        )


class CompletionStream(OpenAIStream):
    """``text_completion`` chunks: each choice's text deltas (the prompt first with ``echo``), with
    their log probabilities when asked for, and its finish reason; then usage if asked."""

    def __init__(
        self,
        model: str,
        texts: TokenTexts,
        *,
        include_usage: bool,
        echo: Callable[[GenerationRequest], str] | None,
        logprobs: bool,
    ) -> None:
        super().__init__(model, texts, include_usage=include_usage)
        self._echo = echo
        self._logprobs = logprobs
        self._echoed: set[int] = set()
        self._sent_routing = False

    def opening(self, run: RequestRun) -> list[bytes]:
        return []

    def delta(self, run: RequestRun, output: GenerationOutput) -> list[bytes]:
        text, token_ids, entries = output.text, output.token_ids, output.logprobs or []
        if self._echo is not None and output.index not in self._echoed:
            self._echoed.add(output.index)
            text = self._echo(run.request) + text
            if output.prompt_logprobs is not None:
                token_ids = [*run.request.prompt_token_ids, *token_ids]
                entries = [*output.prompt_logprobs, *entries]
        if not text and not output.finished and not (self._logprobs and token_ids):
            return []
        choice = CompletionChoice(
            index=output.index,
            text=text,
            finish_reason=run.choices[output.index].finish_reason if output.finished else None,
        )
        if self._logprobs:
            choice.logprobs = completion_logprobs(token_ids, entries, self._texts)
        return [self._event(run, [choice])]

    def closing(self, run: RequestRun) -> list[bytes]:
        if not self._include_usage:
            return []
        return [self._event(run, [], usage=Usage.of(run.prompt_tokens, run.completion_tokens))]

    def _event(self, run: RequestRun, choices: list[CompletionChoice], usage: Usage | None = None) -> bytes:
        chunk = CompletionResponse(
            id=run.request.request_id, created=self._created, model=self._model, choices=choices, usage=usage
        )
        if not self._sent_routing:  # the first chunk says what served the request
            chunk.taer = run.routing
            self._sent_routing = True
        return self._sse(chunk)
