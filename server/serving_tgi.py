"""``POST /generate`` and ``POST /generate_stream`` in text-generation-inference's shapes.

Differences from TGI, on purpose: errors use the OpenAI error shape (as every route here does);
``do_sample: false`` decodes greedily even when a temperature is given; a streamed event carries
one engine output, which is one token unless the engine coalesced several (its ``id`` and
``logprob`` are then the last one's), and its ``text`` is the text released with it (held back
while a stop string may be forming). Log probabilities are the model's own, before sampling's
changes (as on the OpenAI routes); ``details.tokens`` lists every generated token,
``details.prefill`` (with ``decoder_input_details``) the prompt's.
"""

from __future__ import annotations

import json
import secrets
from typing import TYPE_CHECKING

from fastapi.responses import JSONResponse, Response
from starlette.requests import Request

from expert_store.errors import RequestError
from server.engine_api import FinishReason, GenerationOutput, GenerationRequest, TokenLogprob
from server.protocol import TgiGrammar, TgiRequest
from server.request_run import RequestRun, routing_headers, sse_event
from server.responses import (
    TgiDetails,
    TgiPrefillToken,
    TgiResponse,
    TgiStreamDetails,
    TgiStreamEvent,
    TgiToken,
    to_json,
)
from server.serving import RequestedSampling, ServingBase

if TYPE_CHECKING:
    from server.structured import OutputConstraint

API_DEFAULT_MAX_NEW_TOKENS = 100  # TGI's default

_PARAM_NAMES = {
    name: f"parameters.{name}"
    for name in ("temperature", "top_p", "top_k", "seed", "stop", "repetition_penalty")
} | {"max_tokens": "parameters.max_new_tokens"}


class ServingTGI(ServingBase):
    """TGI's generate routes."""

    async def generate(self, body: TgiRequest, raw: Request) -> Response:
        request = self.to_generation_request(body)
        result = await RequestRun(self.context, request, raw).complete()
        (choice,) = result.choices
        details = None
        if body.parameters.details:
            stream_details = _details(
                choice.finish_reason or "stop",
                choice.stop_reason,
                generated_tokens=result.completion_tokens,
                seed=request.sampling.seed,
                input_length=result.prompt_tokens,
            )
            details = TgiDetails(
                **stream_details.model_dump(),
                prefill=self._prefill(request, choice.prompt_logprobs),
                tokens=[self._token(e, choice, i) for i, e in enumerate(choice.logprobs or [])],
                top_tokens=None
                if not body.parameters.top_n_tokens
                else [self.top_tokens(e) for e in choice.logprobs or []],
            )
        response = TgiResponse(
            generated_text=_prefix(body) + choice.text,
            details=details,
            taer=result.routing,
        )
        return JSONResponse(
            to_json(response, omit_if_none=("taer", "details")), headers=routing_headers(result.routing)
        )

    async def generate_stream(self, body: TgiRequest, raw: Request) -> Response:
        run = RequestRun(self.context, self.to_generation_request(body, stream=True), raw)
        # TGI ends its streams without a [DONE] marker.
        return await run.stream(_TgiStream(_prefix(body), self), done_marker=False)

    def _prefill(self, request: GenerationRequest, entries) -> list[TgiPrefillToken]:
        if entries is None:
            return []
        return [
            TgiPrefillToken(id=token, text=self.token_texts(token), logprob=None if e is None else e.logprob)
            for token, e in zip(request.prompt_token_ids, entries, strict=True)
        ]

    def _token(self, entry: TokenLogprob, choice, index: int) -> TgiToken:
        # The last token of a sequence that ended on its own, not on a stop string, is the end token.
        is_eos = (
            index == len(choice.token_ids) - 1
            and choice.finish_reason == "stop"
            and choice.stop_reason is None
        )
        return TgiToken(
            id=entry.token_id, text=self.token_texts(entry.token_id), logprob=entry.logprob, special=is_eos
        )

    def top_tokens(self, entry: TokenLogprob) -> list[TgiToken]:
        return [
            TgiToken(id=token, text=self.token_texts(token), logprob=logprob) for token, logprob in entry.top
        ]

    def to_generation_request(self, body: TgiRequest, *, stream: bool = False) -> GenerationRequest:
        """TGI reports each token's log probability in a stream and in ``details``; the prompt's
        with ``decoder_input_details``."""
        params = body.parameters
        scored = stream or params.details
        seed = params.seed
        if params.do_sample and seed is None:
            # Chosen here, not in the engine, so that `details.seed` can report it.
            seed = secrets.randbits(63)
        prompt_token_ids = self.encode(body.inputs, add_special_tokens=True)
        asked = RequestedSampling(
            max_tokens=params.max_new_tokens,
            temperature=params.temperature if params.do_sample else 0.0,
            top_p=params.top_p,
            top_k=params.top_k,
            seed=seed if params.do_sample else None,
            stop=() if params.stop is None else tuple(params.stop),
            repetition_penalty=params.repetition_penalty,
            constraint=_grammar_constraint(params.grammar),
            logprobs=(params.top_n_tokens or 0) if scored else None,
            prompt_logprobs=0 if params.details and params.decoder_input_details and not stream else None,
            prompt_param="inputs",
            names=_PARAM_NAMES,
        )
        return self.generation_request(
            "tgi", prompt_token_ids, body.inputs, asked, body.taer, api_max_tokens=API_DEFAULT_MAX_NEW_TOKENS
        )


def _grammar_constraint(grammar: TgiGrammar | None) -> OutputConstraint | None:
    """TGI's ``grammar``: a JSON schema (an object, or a string holding one) or a regex."""
    if grammar is None:
        return None
    from server.structured import OutputConstraint  # the grammar engine loads on first use

    if grammar.type == "regex":
        if not isinstance(grammar.value, str):
            raise RequestError("a regex grammar's value must be a string", param="parameters.grammar.value")
        return OutputConstraint("regex", grammar.value, param="parameters.grammar")
    schema = grammar.value
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as error:
            raise RequestError(
                f"a json grammar's value is a string that is not JSON ({error})",
                param="parameters.grammar.value",
            ) from None
        if not isinstance(schema, dict):
            raise RequestError(
                "a json grammar's value must be a JSON schema object", param="parameters.grammar.value"
            )
    return OutputConstraint("json_schema", schema, param="parameters.grammar")


def _prefix(body: TgiRequest) -> str:
    return body.inputs if body.parameters.return_full_text else ""


def _details(
    finish_reason: FinishReason,
    stop_reason: str | None,
    *,
    generated_tokens: int,
    seed: int | None,
    input_length: int,
) -> TgiStreamDetails:
    if finish_reason == "length":
        tgi_reason = "length"
    else:
        tgi_reason = "stop_sequence" if stop_reason is not None else "eos_token"
    return TgiStreamDetails(
        finish_reason=tgi_reason, generated_tokens=generated_tokens, seed=seed, input_length=input_length
    )


class _TgiStream:
    """One event per engine output that carries tokens; the last one also carries
    ``generated_text`` and ``details``."""

    def __init__(self, prefix: str, serving: ServingTGI) -> None:
        self._prefix = prefix
        self._serving = serving
        self._texts: list[str] = []
        self._index = 0
        self._last_token_id = 0

    def opening(self, run: RequestRun) -> list[bytes]:
        return []

    def delta(self, run: RequestRun, output: GenerationOutput) -> list[bytes]:
        if not (output.token_ids or output.text or output.finished):
            return []
        self._index += 1
        self._texts.append(output.text)
        if output.token_ids:
            self._last_token_id = output.token_ids[-1]
        # A finishing output without text is the end-of-sequence token.
        is_eos = (
            output.finished and not output.text and run.finish_reason == "stop" and run.stop_reason is None
        )
        last = output.logprobs[-1] if output.logprobs else None
        token = TgiToken(
            id=self._last_token_id,
            text=output.text,
            logprob=None if last is None else last.logprob,
            special=is_eos,
        )
        event = TgiStreamEvent(index=self._index, token=token)
        if last is not None and run.request.sampling.logprobs:
            event.top_tokens = self._serving.top_tokens(last)
        if self._index == 1:
            event.taer = run.routing
        if output.finished:
            assert run.finish_reason is not None
            event.generated_text = self._prefix + "".join(self._texts)
            event.details = _details(
                run.finish_reason,
                run.stop_reason,
                generated_tokens=run.completion_tokens,
                seed=run.request.sampling.seed,
                input_length=run.prompt_tokens,
            )
        return [sse_event(to_json(event))]

    def closing(self, run: RequestRun) -> list[bytes]:
        return []
