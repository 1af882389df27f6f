"""Response bodies of the HTTP API (OpenAI and TGI shapes); the requests are in ``protocol.py``."""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, Field, WithJsonSchema

from server.engine_api import RoutingInfo
from server.protocol import CONTENT_SCHEMA


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    """A chat choice's ``logprobs``: one entry per generated token."""

    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    """A text completion choice's ``logprobs`` (the legacy shape): parallel lists, one entry per
    token (with ``echo``, the prompt's tokens first; the very first has no log probability)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Annotated[str, WithJsonSchema(CONTENT_SCHEMA)]


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: ChatLogprobs | None = None


ChoiceT = TypeVar("ChoiceT", bound=BaseModel)


class OpenAIBody(BaseModel, Generic[ChoiceT]):
    """The envelope the OpenAI completion bodies share; each subclass fixes ``object`` to its own
    literal, and adds its fields after ``usage``."""

    id: str
    object: str
    created: int
    model: str
    choices: list[ChoiceT]
    usage: Usage | None = None


class ChatCompletionResponse(OpenAIBody[ChatChoice]):
    object: Literal["chat.completion"] = "chat.completion"
    usage: Usage
    system_fingerprint: str | None = None
    taer: RoutingInfo | None = None  # what served the request


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: dict[str, str]
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(OpenAIBody[ChatChunkChoice]):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    taer: RoutingInfo | None = None  # what served the request


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(OpenAIBody[CompletionChoice]):
    """A whole completion, and (with ``finish_reason`` possibly null) one streamed chunk."""

    object: Literal["text_completion"] = "text_completion"
    taer: RoutingInfo | None = None  # what served the request


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "taer"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TgiStreamDetails(BaseModel):
    """``details`` of a stream's last event."""

    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None
    input_length: int


class TgiPrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None  # the first prompt token has none


class TgiToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None
    special: bool = False


class TgiDetails(TgiStreamDetails):
    """``details`` of ``POST /generate``: the generated tokens with their log probabilities, the
    prompt's with ``decoder_input_details``, the alternatives with ``top_n_tokens``."""

    prefill: list[TgiPrefillToken] = Field(default_factory=list)
    tokens: list[TgiToken] = Field(default_factory=list)
    top_tokens: list[list[TgiToken]] | None = None


class TgiResponse(BaseModel):
    generated_text: str
    details: TgiDetails | None = None
    taer: RoutingInfo | None = None  # what served the request


class TgiStreamEvent(BaseModel):
    index: int
    token: TgiToken
    top_tokens: list[TgiToken] | None = None
    generated_text: str | None = None
    details: TgiStreamDetails | None = None
    taer: RoutingInfo | None = None  # what served the request


def to_json(model: BaseModel, omit_if_none: tuple[str, ...] = ("taer",)) -> dict[str, Any]:
    """``model`` as JSON data, leaving out the named top-level fields when they are ``None``."""
    data = model.model_dump(mode="json")
    for key in omit_if_none:
        if data.get(key, 0) is None:
            del data[key]
    return data
