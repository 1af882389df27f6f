"""``POST /v1/chat/completions``: messages -> chat template -> engine -> OpenAI chat responses."""

from __future__ import annotations

import time
import uuid

from fastapi.responses import JSONResponse, Response
from jinja2 import TemplateError
from starlette.requests import Request

from expert_store.errors import RequestError
from server.engine_api import GenerationOutput, GenerationRequest
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    Usage,
    to_json,
)
from server.request_run import RequestRun
from server.serving_base import RequestedSampling, ServingBase, routing_headers, sse_event, stop_tuple


class ServingChat(ServingBase):
    """Chat completions, streamed or not."""

    async def create(self, body: ChatCompletionRequest, raw: Request) -> Response:
        self.check_model(body.model)
        request = self.to_generation_request(body)
        if body.stream:
            run, first = await self.start_stream(request, raw)
            renderer = _ChatStream(self.served_model_name, include_usage=body.include_usage)
            return self.sse_response(run, first, renderer, done_marker=True)
        result = await self.complete(request, raw)
        response = ChatCompletionResponse(
            id=request.request_id,
            created=int(time.time()),
            model=self.served_model_name,
            choices=[
                ChatChoice(message=AssistantMessage(content=result.text), finish_reason=result.finish_reason)
            ],
            usage=Usage.of(result.prompt_tokens, result.completion_tokens),
            taer=result.routing,
        )
        return JSONResponse(to_json(response), headers=routing_headers(result.routing))

    def to_generation_request(self, body: ChatCompletionRequest) -> GenerationRequest:
        conversation = [{"role": message.role, "content": message.content} for message in body.messages]
        # The template writes the special tokens itself; encoding must not add a second BOS.
        prompt_token_ids = self.encode(self._render(conversation), add_special_tokens=False)
        max_tokens_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        asked = RequestedSampling(
            max_tokens=body.max_completion_tokens
            if body.max_completion_tokens is not None
            else body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            stop=stop_tuple(body.stop),
            repetition_penalty=body.repetition_penalty,
            ignore_eos=body.ignore_eos,
            prompt_param="messages",
            names={"max_tokens": max_tokens_param},
        )
        return GenerationRequest(
            request_id=f"chatcmpl-{uuid.uuid4().hex}",
            prompt_token_ids=prompt_token_ids,
            retrieval_text=_retrieval_text(body.messages),
            sampling=self.sampling_params(asked, len(prompt_token_ids), api_max_tokens=None),
            taer=self.taer_options(body.taer),
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


def _retrieval_text(messages: list[ChatMessage]) -> str:
    """What retrieval embeds: the last user message (the last message if no user spoke)."""
    for message in reversed(messages):
        if message.role == "user":
            return message.content
    return messages[-1].content


class _ChatStream:
    """``chat.completion.chunk`` events: the role, the content deltas, the finish reason, usage."""

    def __init__(self, model: str, *, include_usage: bool) -> None:
        self._model = model
        self._include_usage = include_usage
        self._created = int(time.time())

    def opening(self, run: RequestRun) -> list[bytes]:
        role = self._chunk(run, {"role": "assistant", "content": ""})
        role.taer = run.routing
        return [self._event(role)]

    def delta(self, run: RequestRun, output: GenerationOutput) -> list[bytes]:
        return [self._event(self._chunk(run, {"content": output.text}))] if output.text else []

    def closing(self, run: RequestRun) -> list[bytes]:
        events = [self._event(self._chunk(run, {}, finish_reason=run.finish_reason))]
        if self._include_usage:
            usage = ChatCompletionChunk(
                id=run.request.request_id,
                created=self._created,
                model=self._model,
                choices=[],
                usage=Usage.of(run.prompt_tokens, run.completion_tokens),
            )
            events.append(self._event(usage))
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

    def _event(self, chunk: ChatCompletionChunk) -> bytes:
        omit = ("taer",) if self._include_usage else ("taer", "usage")
        return sse_event(to_json(chunk, omit_if_none=omit))
