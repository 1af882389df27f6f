"""Request and response bodies of the HTTP API (OpenAI and TGI shapes). Pydantic lives here only.

Request models are strict (``"0.5"`` is not a number, ``"16"`` is not an integer; ``16.0`` is
one, as JSON Schema has it, ``16.5`` is not) and ignore fields they do not know, as OpenAI clients
send many. Fields whose silent omission would change the answer (``n > 1``, ``logprobs``,
``tools``, non-zero presence/frequency penalties, ``echo``, ...) are declared so that anything but
their "off" value is refused with a message naming the field. Presence and frequency penalties are
refused rather than mapped onto the repetition penalty: they are additive and count-based, and no
mapping gives the same distribution.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, WithJsonSchema, field_validator

from expert_store.errors import RequestError
from expert_store.modes import MODES
from server.engine_api import (
    MAX_STOP_STRINGS,
    REPETITION_PENALTY_RANGE,
    SEED_RANGE,
    RoutingInfo,
    TaerOptions,
    check_mode,
    check_stop_strings,
)

_TEXT_PART_HINT = "a string or a list of {'type': 'text', 'text': ...} parts"

# What the "before" validators below accept, published as it is in /openapi.json (pydantic would
# document only the type they convert to).
_STOP_SCHEMA = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOP_STRINGS},
        {"type": "null"},
    ],
    "description": f"a stop string or a list of at most {MAX_STOP_STRINGS}, none empty",
}
_PROMPT_SCHEMA = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 1},
    ],
    "description": "one text prompt: a string, or a list holding one string",
}
_CONTENT_SCHEMA = {
    "anyOf": [
        {"type": "string"},
        {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
                "required": ["type", "text"],
            },
        },
    ],
    "description": _TEXT_PART_HINT,
}
StopStrings = Annotated[list[str] | None, WithJsonSchema(_STOP_SCHEMA)]


def _lone_surrogate(value: Any) -> str | None:
    """A description of the first lone UTF-16 surrogate in ``value`` (a string, or strings nested in
    lists and dicts), or ``None``. JSON's ``\\ud800`` escapes decode to such code points, which no
    tokenizer can encode and no UTF-8 response can carry."""
    if isinstance(value, str):
        for index, char in enumerate(value):
            if "\ud800" <= char <= "\udfff":
                return f"U+{ord(char):04X} at character {index}"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _lone_surrogate(key) if isinstance(key, str) else None
        if (found := found or _lone_surrogate(item)) is not None:
            return found
    return None


class _TextChecked(BaseModel):
    """Refuses, naming the field, any text holding a lone UTF-16 surrogate. NUL and other control
    characters are valid Unicode and pass through to the tokenizer, which encodes them."""

    @field_validator("*", mode="after")
    @classmethod
    def _refuse_lone_surrogates(cls, value: Any) -> Any:
        found = _lone_surrogate(value)
        if found is not None:
            raise ValueError(f"contains a lone UTF-16 surrogate ({found}); send valid Unicode text")
        return value


def _document_unsupported(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """Publishes each unsupported field as the enum of its "off" values, with the reason."""
    for name, (allowed, why) in getattr(model, "unsupported", {}).items():
        if name in schema.get("properties", {}):
            schema["properties"][name] = {"enum": list(allowed), "description": why}


class _EdgeModel(_TextChecked):
    """A request body: strict types, unknown fields ignored, unsupported features refused."""

    model_config = ConfigDict(strict=True, extra="ignore", json_schema_extra=_document_unsupported)

    # field name -> (values that mean "off", why anything else is refused)
    unsupported: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {}

    @field_validator("*", mode="before")
    @classmethod
    def _integral_floats(cls, value: Any, info: ValidationInfo) -> Any:
        # JSON does not tell 16 from 16.0, and JSON Schema's "integer" holds both.
        if isinstance(value, float) and value.is_integer() and cls._is_integer_field(info.field_name):
            return int(value)
        return value

    @classmethod
    def _is_integer_field(cls, name: str | None) -> bool:
        field = cls.model_fields.get(name or "")
        return field is not None and field.annotation in (int, int | None)

    @field_validator("*", mode="after")
    @classmethod
    def _refuse_unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        rule = cls.unsupported.get(info.field_name or "")
        if rule is not None and not any(value == off for off in rule[0]):
            raise ValueError(rule[1])
        return value


def _stop_list(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return None if value is None else [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        try:
            return list(check_stop_strings(value))
        except RequestError as error:
            raise ValueError(str(error)) from None
    raise ValueError("must be a string or a list of strings")


class TaerRequest(_TextChecked):
    """The ``taer`` extension: force a task's pattern, or choose the expert mode."""

    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        json_schema_extra={  # a task's pattern and the full model exclude each other
            "not": {
                "required": ["task", "mode"],
                "properties": {"task": {"type": "string"}, "mode": {"const": "full"}},
            }
        },
    )

    task: str | None = None
    mode: Annotated[str | None, WithJsonSchema({"enum": [*MODES, None]})] = None

    @field_validator("mode")
    @classmethod
    def _known_mode(cls, value: str | None) -> str | None:
        try:
            if value is not None:
                check_mode(value)
        except RequestError as error:
            raise ValueError(str(error)) from None
        return value

    def to_options(self) -> TaerOptions:
        return TaerOptions(task=self.task, mode=self.mode)  # type: ignore[arg-type]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool = False


class _OpenAISampling(_EdgeModel):
    """Fields shared by chat and text completions. ``top_k``, ``repetition_penalty``,
    ``ignore_eos`` and ``taer`` are extensions (pass them with the OpenAI client's ``extra_body``).
    ``top_k = -1`` is accepted as "off", as vLLM has it."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: StopStrings = None
    repetition_penalty: float | None = Field(
        default=None, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1]
    )
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    taer: TaerRequest | None = None
    n: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None

    unsupported: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {
        "n": ((None, 1), "only n=1 is supported; send several requests instead"),
        "presence_penalty": ((None, 0), "only 0 is supported; use repetition_penalty (an extension) instead"),
        "frequency_penalty": (
            (None, 0),
            "only 0 is supported; use repetition_penalty (an extension) instead",
        ),
        "logit_bias": ((None, {}), "logit_bias is not supported"),
        "logprobs": ((None, False), "logprobs are not supported"),
        "top_logprobs": ((None, 0), "logprobs are not supported"),
        "tools": ((None, []), "tool calling is not supported"),
        "functions": ((None, []), "function calling is not supported"),
        "response_format": ((None, {"type": "text"}), "only the 'text' response format is supported"),
        "echo": ((None, False), "echo is not supported; the prompt is what you sent"),
        "suffix": ((None, ""), "suffix (insertion) is not supported"),
        "best_of": ((None, 1), "only best_of=1 is supported"),
    }

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, value: Any) -> Any:
        return _stop_list(value)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatMessage(_TextChecked):
    """One message. Text parts of a list ``content`` are joined with newlines."""

    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: Annotated[str, WithJsonSchema(_CONTENT_SCHEMA)]
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError(f"must be {_TEXT_PART_HINT}")
        texts = []
        for index, part in enumerate(value):
            if not (
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            ):
                raise ValueError(
                    f"part {index} is not a text part; only text is supported ({_TEXT_PART_HINT})"
                )
            texts.append(part["text"])
        return "\n".join(texts)


class ChatCompletionRequest(_OpenAISampling):
    """``POST /v1/chat/completions``. ``max_completion_tokens`` wins over ``max_tokens``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: Any = None
    top_logprobs: Any = None
    tools: Any = None
    functions: Any = None
    response_format: Any = None


class CompletionRequest(_OpenAISampling):
    """``POST /v1/completions``: one text prompt (a list holding one string is accepted)."""

    prompt: Annotated[str, WithJsonSchema(_PROMPT_SCHEMA)]
    echo: Any = None
    suffix: Any = None
    best_of: Any = None
    logprobs: Any = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_text_prompt(cls, value: Any) -> Any:
        if isinstance(value, list):
            if len(value) == 1 and isinstance(value[0], str):
                return value[0]
            if value and all(isinstance(v, int | list) for v in value):
                raise ValueError("token-id prompts are not supported; send the prompt as text")
            raise ValueError("send exactly one prompt per request (a string)")
        return value

    @field_validator("prompt", mode="after")
    @classmethod
    def _prompt_has_text(cls, value: str) -> str:
        return _non_empty(value)


def _non_empty(text: str) -> str:
    if not text:
        raise ValueError("the prompt is empty; send some text")
    return text


class TgiParameters(_EdgeModel):
    """TGI's ``parameters``. ``do_sample: false`` (the default) decodes greedily whatever the
    temperature says."""

    max_new_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    do_sample: bool = False
    seed: int | None = Field(default=None, ge=0, le=SEED_RANGE[1])
    stop: StopStrings = None
    details: bool = False
    return_full_text: bool = False
    repetition_penalty: float | None = Field(
        default=None, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1]
    )
    best_of: Any = None
    typical_p: Any = None
    truncate: Any = None
    watermark: Any = None
    grammar: Any = None
    top_n_tokens: Any = None
    decoder_input_details: Any = None
    frequency_penalty: Any = None

    unsupported: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {
        "best_of": ((None, 1), "only best_of=1 is supported"),
        "typical_p": ((None, 1), "typical_p is not supported"),
        "truncate": ((None,), "truncate is not supported; shorten the input instead"),
        "watermark": ((None, False), "watermark is not supported"),
        "grammar": ((None,), "grammar-constrained generation is not supported"),
        "top_n_tokens": ((None, 0), "top_n_tokens is not supported"),
        "decoder_input_details": ((None, False), "decoder_input_details is not supported"),
        "frequency_penalty": ((None, 0), "only 0 is supported; use repetition_penalty instead"),
    }

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, value: Any) -> Any:
        return _stop_list(value)


class TgiRequest(_EdgeModel):
    """``POST /generate`` and ``POST /generate_stream``; ``taer`` is the extension."""

    # minLength by a validator, not pydantic's min_length: that one reads the string before the
    # lone-surrogate check can name the field.
    inputs: str = Field(json_schema_extra={"minLength": 1})
    parameters: TgiParameters = Field(default_factory=TgiParameters)
    taer: TaerRequest | None = None

    @field_validator("inputs", mode="after")
    @classmethod
    def _inputs_have_text(cls, value: str) -> str:
        return _non_empty(value)


# Responses ------------------------------------------------------------------------------------------


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


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Annotated[str, WithJsonSchema(_CONTENT_SCHEMA)]


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    taer: RoutingInfo | None = None  # what served the request


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: dict[str, str]
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    taer: RoutingInfo | None = None  # what served the request


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class CompletionResponse(BaseModel):
    """A whole completion, and (with ``finish_reason`` possibly null) one streamed chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
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


class TgiDetails(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None
    input_length: int


class TgiResponse(BaseModel):
    generated_text: str
    details: TgiDetails | None = None
    taer: RoutingInfo | None = None  # what served the request


class TgiToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None
    special: bool = False


class TgiStreamEvent(BaseModel):
    index: int
    token: TgiToken
    top_tokens: None = None
    generated_text: str | None = None
    details: TgiDetails | None = None
    taer: RoutingInfo | None = None  # what served the request


def to_json(model: BaseModel, omit_if_none: tuple[str, ...] = ("taer",)) -> dict[str, Any]:
    """``model`` as JSON data, leaving out the named top-level fields when they are ``None``."""
    data = model.model_dump(mode="json")
    for key in omit_if_none:
        if data.get(key, 0) is None:
            del data[key]
    return data
