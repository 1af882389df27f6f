"""The serving objects: each turns one API shape's request into a :class:`GenerationRequest`, hands it
to a :class:`~server.request_run.RequestRun`, and turns the run's outputs into that shape's response.
The routes in ``app.py`` only call them.

Here: what every shape shares (:class:`ServingBase`: the model and task checks, sampling parameters
with their precedence and the context check), and the two OpenAI shapes, ``POST /v1/chat/completions``
and ``POST /v1/completions``, which share one ``create``. Their streams are in ``serving_streams.py``,
their log probabilities' shapes in ``serving_logprobs.py``; TGI's shape is in ``serving_tgi.py``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from fastapi.responses import JSONResponse, Response
from jinja2 import TemplateError
from pydantic import BaseModel
from starlette.requests import Request

from expert_store.errors import RequestError, UnknownTaskError
from server.engine_api import GenerationRequest, SamplingParams, TaerOptions
from server.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, ResponseFormat, TaerRequest
from server.request_run import (
    Choice,
    Completion,
    RequestRun,
    ServingContext,
    StreamRenderer,
    routing_headers,
)
from server.responses import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionResponse,
    Usage,
    to_json,
)
from server.serving_logprobs import TokenTexts, chat_logprobs, completion_logprobs
from server.serving_streams import ChatStream, CompletionStream

if TYPE_CHECKING:
    from server.structured import OutputConstraint

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
    n: int = 1
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    constraint: OutputConstraint | None = None
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
        self._token_texts: TokenTexts | None = None

    @property
    def token_texts(self) -> TokenTexts:
        """Token texts for log probabilities (made once the engine's tokenizer is loaded)."""
        if self._token_texts is None:
            self._token_texts = TokenTexts(self.engine.tokenizer)
        return self._token_texts

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
                n=asked.n,
                logprobs=asked.logprobs,
                prompt_logprobs=asked.prompt_logprobs,
                constraint=asked.constraint,
            )
        except RequestError as error:
            error.param = asked.name(error.param or "")
            raise


class _OpenAIServing(ServingBase):
    """Chat and text completions: one ``create``; each subclass translates its own shape. A request
    may hold several prompts (text completions): each is one generation, run concurrently."""

    async def create(self, body: ChatCompletionRequest | CompletionRequest, raw: Request) -> Response:
        self.check_model(body.model)
        requests = self.to_generation_requests(body)
        runs: list[RequestRun] = []
        try:
            for request in requests:
                runs.append(RequestRun(self.context, request, raw))  # admission, one by one
        except BaseException:
            for run in runs:
                await run.close()
            raise
        if body.stream:
            return await runs[0].stream(self.renderer(body), done_marker=True)
        results = await _complete_all(runs)
        response = self.response(body, requests, results)
        return JSONResponse(to_json(response), headers=routing_headers(results[0].routing))

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
            "n": body.num_samples,
        }
        return RequestedSampling(**(fields | shape))  # type: ignore[arg-type]

    def to_generation_requests(self, body) -> list[GenerationRequest]:
        raise NotImplementedError

    def renderer(self, body) -> StreamRenderer:
        raise NotImplementedError

    def response(self, body, requests: list[GenerationRequest], results: list[Completion]) -> BaseModel:
        raise NotImplementedError


class ServingChat(_OpenAIServing):
    """Chat completions: messages -> chat template -> engine -> OpenAI chat responses."""

    def to_generation_requests(self, body: ChatCompletionRequest) -> list[GenerationRequest]:
        if body.top_logprobs is not None and not body.logprobs:
            raise RequestError("top_logprobs needs logprobs: true", param="top_logprobs")
        conversation = [{"role": message.role, "content": message.content} for message in body.messages]
        # The template writes the special tokens itself; encoding must not add a second BOS.
        prompt_token_ids = self.encode(self._render(conversation), add_special_tokens=False)
        completion_tokens = body.max_completion_tokens
        asked = self.asked_sampling(
            body,
            max_tokens=body.max_tokens if completion_tokens is None else completion_tokens,
            logprobs=(body.top_logprobs or 0) if body.logprobs else None,
            constraint=_response_format_constraint(body.response_format),
            prompt_param="messages",
            names={"max_tokens": "max_tokens" if completion_tokens is None else "max_completion_tokens"},
        )
        text = _retrieval_text(body.messages)
        return [
            self.generation_request("chatcmpl", prompt_token_ids, text, asked, body.taer, api_max_tokens=None)
        ]

    def renderer(self, body: ChatCompletionRequest) -> StreamRenderer:
        return ChatStream(self.served_model_name, self.token_texts, include_usage=body.include_usage)

    def response(
        self, body: ChatCompletionRequest, requests: list[GenerationRequest], results: list[Completion]
    ) -> ChatCompletionResponse:
        (request,), (result,) = requests, results
        return ChatCompletionResponse(
            id=request.request_id,
            created=int(time.time()),
            model=self.served_model_name,
            choices=[
                ChatChoice(
                    index=choice.index,
                    message=AssistantMessage(content=choice.text),
                    finish_reason=choice.finish_reason or "stop",
                    logprobs=None
                    if choice.logprobs is None
                    else chat_logprobs(choice.logprobs, self.token_texts),
                )
                for choice in result.choices
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
    """Text completions: prompts (text or token ids) -> engine -> OpenAI text completions.

    A token-id prompt is decoded to text for retrieval (retrieval embeds text) and for ``echo``.
    ``echo`` puts the prompt before each choice's text and, with ``logprobs``, its tokens' log
    probabilities before the generated ones'. With several prompts the response's ``taer`` field and
    ``x-taer-*`` headers are the first prompt's routing.
    """

    def to_generation_requests(self, body: CompletionRequest) -> list[GenerationRequest]:
        if body.stream and len(body.prompt) > 1:
            raise RequestError(
                "a streamed completion takes one prompt; send the prompts in separate requests, or "
                "without stream",
                param="prompt",
            )
        prompt_logprobs = None
        if body.echo and (body.logprobs is not None or body.max_tokens == 0):
            prompt_logprobs = body.logprobs or 0  # the engine scores a prompt it generates nothing for
        asked = self.asked_sampling(
            body, logprobs=body.logprobs, prompt_logprobs=prompt_logprobs, prompt_param="prompt"
        )
        requests = []
        for index, prompt in enumerate(body.prompt):
            token_ids, text = self._tokens_and_text(prompt, index, len(body.prompt))
            requests.append(
                self.generation_request(
                    "cmpl", token_ids, text, asked, body.taer, api_max_tokens=API_DEFAULT_MAX_TOKENS
                )
            )
        return requests

    def _tokens_and_text(self, prompt: str | list[int], index: int, count: int) -> tuple[list[int], str]:
        if isinstance(prompt, str):
            return self.encode(prompt, add_special_tokens=True), prompt
        vocab_size = len(self.engine.tokenizer)
        bad = next((token for token in prompt if token >= vocab_size), None)
        if bad is not None:
            where = "prompt" if count == 1 else f"prompt {index}"
            raise RequestError(
                f"{where} holds token id {bad}, which is not in the vocabulary (ids are 0 to {vocab_size - 1})",
                param="prompt",
            )
        return list(prompt), self.engine.tokenizer.decode(prompt, skip_special_tokens=True)

    def renderer(self, body: CompletionRequest) -> StreamRenderer:
        return CompletionStream(
            self.served_model_name,
            self.token_texts,
            include_usage=body.include_usage,
            echo=self._echo_text if body.echo else None,
            logprobs=body.logprobs is not None,
        )

    def _echo_text(self, request: GenerationRequest) -> str:
        return self.engine.tokenizer.decode(request.prompt_token_ids, skip_special_tokens=True)

    def response(
        self, body: CompletionRequest, requests: list[GenerationRequest], results: list[Completion]
    ) -> CompletionResponse:
        choices = []
        for request, result in zip(requests, results, strict=True):
            for choice in result.choices:
                choices.append(self._choice(body, request, choice, index=len(choices)))
        return CompletionResponse(
            id=requests[0].request_id,
            created=int(time.time()),
            model=self.served_model_name,
            choices=choices,
            usage=Usage.of(sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)),
            taer=results[0].routing,
        )

    def _choice(
        self, body: CompletionRequest, request: GenerationRequest, choice: Choice, index: int
    ) -> CompletionChoice:
        text, token_ids, entries = choice.text, choice.token_ids, choice.logprobs or []
        if body.echo:
            text = self._echo_text(request) + text
            if choice.prompt_logprobs is not None:
                token_ids = [*request.prompt_token_ids, *token_ids]
                entries = [*choice.prompt_logprobs, *entries]
        logprobs = None
        if body.logprobs is not None:
            logprobs = completion_logprobs(token_ids, entries, self.token_texts)
        return CompletionChoice(index=index, text=text, finish_reason=choice.finish_reason, logprobs=logprobs)


async def _complete_all(runs: list[RequestRun]) -> list[Completion]:
    """Every run to its end, concurrently; if one fails, the others are aborted."""
    tasks = [asyncio.ensure_future(run.complete()) for run in runs]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _response_format_constraint(response_format: ResponseFormat | None) -> OutputConstraint | None:
    if response_format is None or response_format.type == "text":
        return None
    from server.structured import OutputConstraint  # the grammar engine loads on first use

    if response_format.type == "json_object":
        return OutputConstraint("json_object")
    if response_format.json_schema is None:
        raise RequestError(
            "response_format of type 'json_schema' needs a 'json_schema' object with the 'schema'",
            param="response_format.json_schema",
        )
    return OutputConstraint("json_schema", response_format.json_schema.schema_)


def _retrieval_text(messages: list[ChatMessage]) -> str:
    """What retrieval embeds: the last user message (the last message if no user spoke)."""
    for message in reversed(messages):
        if message.role == "user":
            return message.content
    return messages[-1].content


def _first_set(*values: T | None) -> T:
    for value in values:
        if value is not None:
            return value
    raise AssertionError("the last value is the API default and is never None")
