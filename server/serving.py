"""The serving objects: each turns one API shape's request into a :class:`GenerationRequest`, hands it
to a :class:`~server.request_run.RequestRun`, and turns the run's outputs into that shape's response.
The routes in ``app.py`` only call them.

Here: what every shape shares (:class:`ServingBase`: the model and task checks, sampling parameters
with their precedence and the context check), and the two OpenAI shapes, ``POST /v1/chat/completions``
and ``POST /v1/completions``, which share one ``create``. TGI's shape is in ``serving_tgi.py``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi.responses import JSONResponse, Response
from jinja2 import TemplateError
from pydantic import BaseModel
from starlette.requests import Request

from expert_store.errors import RequestError, UnknownTaskError
from server.engine_api import GenerationOutput, GenerationRequest, SamplingParams, TaerOptions
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    TaerRequest,
    Usage,
    to_json,
)
from server.request_run import (
    Completion,
    RequestRun,
    ServingContext,
    StreamRenderer,
    routing_headers,
    sse_event,
)

T = TypeVar("T")
API_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


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


class ServingBase:
    """Request assembly that every API shape shares."""

    def __init__(self, context: ServingContext) -> None:
        self.context = context
        self.engine = context.engine
        self.settings = context.settings

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

    def generation_request(
        self,
        id_prefix: str,
        prompt_token_ids: list[int],
        retrieval_text: str,
        asked: RequestedSampling,
        taer: TaerRequest | None,
        *,
        api_max_tokens: int | None,
    ) -> GenerationRequest:
        return GenerationRequest(
            request_id=f"{id_prefix}-{uuid.uuid4().hex}",
            prompt_token_ids=prompt_token_ids,
            retrieval_text=retrieval_text,
            sampling=self.sampling_params(asked, len(prompt_token_ids), api_max_tokens),
            taer=self.taer_options(taer),
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


class _OpenAIServing(ServingBase):
    """Chat and text completions: one ``create``; each subclass translates its own shape."""

    async def create(self, body: ChatCompletionRequest | CompletionRequest, raw: Request) -> Response:
        self.check_model(body.model)
        request = self.to_generation_request(body)
        run = RequestRun(self.context, request, raw)
        if body.stream:
            return await run.stream(self.renderer(body), done_marker=True)
        result = await run.complete()
        response = self.response(request.request_id, result)
        return JSONResponse(to_json(response), headers=routing_headers(result.routing))

    def asked_sampling(
        self, body: ChatCompletionRequest | CompletionRequest, **shape: object
    ) -> RequestedSampling:
        """The sampling fields both OpenAI shapes have; ``shape`` adds or overrides the rest."""
        fields = {
            "max_tokens": body.max_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "top_k": body.top_k,
            "seed": body.seed,
            "stop": () if body.stop is None else tuple(body.stop),
            "repetition_penalty": body.repetition_penalty,
            "ignore_eos": body.ignore_eos,
        }
        return RequestedSampling(**(fields | shape))  # type: ignore[arg-type]

    def to_generation_request(self, body) -> GenerationRequest:
        raise NotImplementedError

    def renderer(self, body) -> StreamRenderer:
        raise NotImplementedError

    def response(self, request_id: str, result: Completion) -> BaseModel:
        raise NotImplementedError


class ServingChat(_OpenAIServing):
    """Chat completions: messages -> chat template -> engine -> OpenAI chat responses."""

    def to_generation_request(self, body: ChatCompletionRequest) -> GenerationRequest:
        conversation = [{"role": message.role, "content": message.content} for message in body.messages]
        # The template writes the special tokens itself; encoding must not add a second BOS.
        prompt_token_ids = self.encode(self._render(conversation), add_special_tokens=False)
        completion_tokens = body.max_completion_tokens
        asked = self.asked_sampling(
            body,
            max_tokens=body.max_tokens if completion_tokens is None else completion_tokens,
            prompt_param="messages",
            names={"max_tokens": "max_tokens" if completion_tokens is None else "max_completion_tokens"},
        )
        text = _retrieval_text(body.messages)
        return self.generation_request(
            "chatcmpl", prompt_token_ids, text, asked, body.taer, api_max_tokens=None
        )

    def renderer(self, body: ChatCompletionRequest) -> StreamRenderer:
        return _ChatStream(self.served_model_name, include_usage=body.include_usage)

    def response(self, request_id: str, result: Completion) -> ChatCompletionResponse:
        return ChatCompletionResponse(
            id=request_id,
            created=int(time.time()),
            model=self.served_model_name,
            choices=[
                ChatChoice(message=AssistantMessage(content=result.text), finish_reason=result.finish_reason)
            ],
            usage=Usage.of(result.prompt_tokens, result.completion_tokens),
            taer=result.routing,
        )

    def _render(self, conversation: list[dict[str, str]]) -> str:
        try:
            prompt = self.engine.tokenizer.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=False
            )
        except (ValueError, TemplateError) as error:  # no template, or the template refuses the messages
            raise RequestError(
                f"the chat template cannot render these messages ({error}); use /v1/completions with "
                "a text prompt instead",
                param="messages",
            ) from error
        return str(prompt)


class ServingCompletion(_OpenAIServing):
    """Text completions: a text prompt -> engine -> OpenAI text completions."""

    def to_generation_request(self, body: CompletionRequest) -> GenerationRequest:
        prompt_token_ids = self.encode(body.prompt, add_special_tokens=True)
        asked = self.asked_sampling(body, prompt_param="prompt")
        return self.generation_request(
            "cmpl", prompt_token_ids, body.prompt, asked, body.taer, api_max_tokens=API_DEFAULT_MAX_TOKENS
        )

    def renderer(self, body: CompletionRequest) -> StreamRenderer:
        return _CompletionStream(self.served_model_name, include_usage=body.include_usage)

    def response(self, request_id: str, result: Completion) -> CompletionResponse:
        return CompletionResponse(
            id=request_id,
            created=int(time.time()),
            model=self.served_model_name,
            choices=[CompletionChoice(text=result.text, finish_reason=result.finish_reason)],
            usage=Usage.of(result.prompt_tokens, result.completion_tokens),
            taer=result.routing,
        )


def _retrieval_text(messages: list[ChatMessage]) -> str:
    """What retrieval embeds: the last user message (the last message if no user spoke)."""
    for message in reversed(messages):
        if message.role == "user":
            return message.content
    return messages[-1].content


class _OpenAIStream:
    """What both OpenAI streams share: the model, one creation time, and whether usage is sent."""

    def __init__(self, model: str, *, include_usage: bool) -> None:
        self._model = model
        self._include_usage = include_usage
        self._created = int(time.time())

    def _sse(self, chunk: BaseModel) -> bytes:
        omit = ("taer",) if self._include_usage else ("taer", "usage")
        return sse_event(to_json(chunk, omit_if_none=omit))


class _ChatStream(_OpenAIStream):
    """``chat.completion.chunk`` events: the role, the content deltas, the finish reason, usage."""

    def opening(self, run: RequestRun) -> list[bytes]:
        role = self._chunk(run, {"role": "assistant", "content": ""})
        role.taer = run.routing
        return [self._sse(role)]

    def delta(self, run: RequestRun, output: GenerationOutput) -> list[bytes]:
        return [self._sse(self._chunk(run, {"content": output.text}))] if output.text else []

    def closing(self, run: RequestRun) -> list[bytes]:
        events = [self._sse(self._chunk(run, {}, finish_reason=run.finish_reason))]
        if self._include_usage:
            usage = ChatCompletionChunk(
                id=run.request.request_id,
                created=self._created,
                model=self._model,
                choices=[],
                usage=Usage.of(run.prompt_tokens, run.completion_tokens),
            )
            events.append(self._sse(usage))
        return events

    def _chunk(
        self, run: RequestRun, delta: dict[str, str], finish_reason: str | None = None
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=run.request.request_id,
            created=self._created,
            model=self._model,
            choices=[ChatChunkChoice(delta=delta, finish_reason=finish_reason)],
        )


class _CompletionStream(_OpenAIStream):
    """``text_completion`` chunks: text deltas, the finish reason, then usage if asked."""

    def __init__(self, model: str, *, include_usage: bool) -> None:
        super().__init__(model, include_usage=include_usage)
        self._sent_routing = False

    def opening(self, run: RequestRun) -> list[bytes]:
        return []

    def delta(self, run: RequestRun, output: GenerationOutput) -> list[bytes]:
        if not output.text and not output.finished:
            return []
        finish_reason = run.finish_reason if output.finished else None
        return [self._event(run, [CompletionChoice(text=output.text, finish_reason=finish_reason)])]

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


def _first_set(*values: T | None) -> T:
    for value in values:
        if value is not None:
            return value
    raise AssertionError("the last value is the API default and is never None")
