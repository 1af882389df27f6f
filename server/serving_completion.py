"""``POST /v1/completions``: a text prompt -> engine -> OpenAI text completions."""

from __future__ import annotations

import time
import uuid

from fastapi.responses import JSONResponse, Response
from starlette.requests import Request

from server.engine_api import GenerationOutput, GenerationRequest
from server.protocol import CompletionChoice, CompletionRequest, CompletionResponse, Usage, to_json
from server.request_run import RequestRun
from server.serving_base import RequestedSampling, ServingBase, routing_headers, sse_event, stop_tuple

API_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class ServingCompletion(ServingBase):
    """Text completions, streamed or not."""

    async def create(self, body: CompletionRequest, raw: Request) -> Response:
        self.check_model(body.model)
        request = self.to_generation_request(body)
        if body.stream:
            run, first = await self.start_stream(request, raw)
            renderer = _CompletionStream(self.served_model_name, include_usage=body.include_usage)
            return self.sse_response(run, first, renderer, done_marker=True)
        result = await self.complete(request, raw)
        response = CompletionResponse(
            id=request.request_id,
            created=int(time.time()),
            model=self.served_model_name,
            choices=[CompletionChoice(text=result.text, finish_reason=result.finish_reason)],
            usage=Usage.of(result.prompt_tokens, result.completion_tokens),
            taer=result.routing,
        )
        return JSONResponse(to_json(response), headers=routing_headers(result.routing))

    def to_generation_request(self, body: CompletionRequest) -> GenerationRequest:
        prompt_token_ids = self.encode(body.prompt, add_special_tokens=True)
        asked = RequestedSampling(
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            stop=stop_tuple(body.stop),
            repetition_penalty=body.repetition_penalty,
            ignore_eos=body.ignore_eos,
            prompt_param="prompt",
        )
        return GenerationRequest(
            request_id=f"cmpl-{uuid.uuid4().hex}",
            prompt_token_ids=prompt_token_ids,
            retrieval_text=body.prompt,
            sampling=self.sampling_params(
                asked, len(prompt_token_ids), api_max_tokens=API_DEFAULT_MAX_TOKENS
            ),
            taer=self.taer_options(body.taer),
        )


class _CompletionStream:
    """``text_completion`` chunks: text deltas, the finish reason, then usage if asked."""

    def __init__(self, model: str, *, include_usage: bool) -> None:
        self._model = model
        self._include_usage = include_usage
        self._created = int(time.time())
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
        omit = ("taer",) if self._include_usage else ("taer", "usage")
        return sse_event(to_json(chunk, omit_if_none=omit))
