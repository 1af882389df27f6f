"""Request bodies of the HTTP API (OpenAI and TGI shapes); the responses are in ``responses.py``.

Request models are strict (``"0.5"`` is not a number, ``"16"`` is not an integer; ``16.0`` is
one, as JSON Schema has it, ``16.5`` is not) and ignore fields they do not know, as OpenAI clients
send many. Fields whose silent omission would change the answer (``tools``, non-zero
presence/frequency penalties, ``suffix``, ...) are declared so that anything but their "off" value
is refused with a message naming the field. Presence and frequency penalties are
refused rather than mapped onto the repetition penalty: they are additive and count-based, and no
mapping gives the same distribution.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, WithJsonSchema, field_validator

from expert_store.errors import RequestError
from expert_store.modes import MODES
from server.engine_api import (
    MAX_LOGPROBS,
    MAX_N,
    MAX_STOP_STRINGS,
    REPETITION_PENALTY_RANGE,
    SEED_RANGE,
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
MAX_PROMPTS = 64
"""Prompts in one ``/v1/completions`` request (a batch, as evaluation harnesses send)."""
_TOKEN_IDS_SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_PROMPT_SCHEMA = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {
            "type": "array",
            "items": {"type": "string", "minLength": 1},
            "minItems": 1,
            "maxItems": MAX_PROMPTS,
        },
        _TOKEN_IDS_SCHEMA,
        {"type": "array", "items": _TOKEN_IDS_SCHEMA, "minItems": 1, "maxItems": MAX_PROMPTS},
    ],
    "description": (
        f"a text prompt, a list of at most {MAX_PROMPTS} text prompts, one prompt as token ids, or a "
        "list of such; token ids must be below the vocabulary's size"
    ),
}
Prompt = str | list[int]
"""One prompt: its text, or its token ids."""
CONTENT_SCHEMA = {
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


def _replace(schema: dict[str, Any], published: dict[str, Any]) -> None:
    schema.clear()
    schema.update(published)


def _document_unsupported(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """Publishes each unsupported field as the enum of its "off" values, with the reason, and each
    forbidden combination of fields as a ``not`` clause."""
    for name, (allowed, why) in getattr(model, "unsupported", {}).items():
        if name in schema.get("properties", {}):
            schema["properties"][name] = {"enum": list(allowed), "description": why}
    forbidden = getattr(model, "forbidden", ())
    if forbidden:
        schema["allOf"] = [{"not": clause} for clause in forbidden]


class _EdgeModel(_TextChecked):
    """A request body: strict types, unknown fields ignored, unsupported features refused."""

    model_config = ConfigDict(strict=True, extra="ignore", json_schema_extra=_document_unsupported)

    # field name -> (values that mean "off", why anything else is refused)
    unsupported: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {}
    # JSON schemas of field combinations the server refuses (400), published as ``not`` clauses
    forbidden: ClassVar[tuple[dict[str, Any], ...]] = ()

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


class JsonSchemaFormat(_TextChecked):
    """``response_format.json_schema``: the schema the output must validate against."""

    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_TextChecked):
    """OpenAI's ``response_format``: free text, any JSON object, or JSON matching a schema."""

    model_config = ConfigDict(
        strict=True,
        extra="ignore",
        json_schema_extra={  # type json_schema needs its json_schema
            "not": {
                "required": ["type"],
                "properties": {"type": {"const": "json_schema"}, "json_schema": {"type": "null"}},
            }
        },
    )

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


_GRAMMAR_SCHEMA = {
    "anyOf": [
        {
            "type": "object",
            "properties": {"type": {"const": "json"}, "value": {"type": "object"}},
            "required": ["type", "value"],
        },
        {
            "type": "object",
            "properties": {"type": {"const": "regex"}, "value": {"type": "string", "format": "regex"}},
            "required": ["type", "value"],
        },
    ],
    "description": "a JSON schema the output must validate against, or a regular expression it must match",
}


class TgiGrammar(_TextChecked):
    """TGI's ``parameters.grammar``: ``{"type": "json", "value": schema}`` (the schema as an object,
    or a string holding its JSON) or ``{"type": "regex", "value": pattern}``."""

    model_config = ConfigDict(
        strict=True, extra="ignore", json_schema_extra=lambda schema, _: _replace(schema, _GRAMMAR_SCHEMA)
    )

    type: Literal["json", "regex"]
    value: dict[str, Any] | str


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
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None

    unsupported: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {
        "presence_penalty": ((None, 0), "only 0 is supported; use repetition_penalty (an extension) instead"),
        "frequency_penalty": (
            (None, 0),
            "only 0 is supported; use repetition_penalty (an extension) instead",
        ),
        "logit_bias": ((None, {}), "logit_bias is not supported"),
        "tools": ((None, []), "tool calling is not supported"),
        "functions": ((None, []), "function calling is not supported"),
        "suffix": ((None, ""), "suffix (insertion) is not supported"),
        "best_of": ((None, 1), "only best_of=1 is supported; send n instead"),
    }

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, value: Any) -> Any:
        return _stop_list(value)

    @property
    def num_samples(self) -> int:
        return 1 if self.n is None else self.n

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatMessage(_TextChecked):
    """One message. Text parts of a list ``content`` are joined with newlines."""

    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: Annotated[str, WithJsonSchema(CONTENT_SCHEMA)]
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
    logprobs: bool | None = None
    top_logprobs: int | None = Field(
        default=None, ge=0, le=MAX_LOGPROBS, description="alternatives per token; needs logprobs: true"
    )
    tools: Any = None
    functions: Any = None
    response_format: ResponseFormat | None = None

    forbidden: ClassVar[tuple[dict[str, Any], ...]] = (
        {  # top_logprobs needs logprobs: true
            "required": ["top_logprobs"],
            "properties": {"top_logprobs": {"type": "integer"}, "logprobs": {"enum": [False, None]}},
        },
    )


class CompletionRequest(_OpenAISampling):
    """``POST /v1/completions``: a prompt or a batch of them, each text or token ids. Each prompt
    gets ``n`` choices (choice ``i * n + j`` is prompt ``i``'s sample ``j``). ``max_tokens`` may be 0
    with ``echo`` (the prompt alone, scored when ``logprobs`` is set)."""

    prompt: Annotated[list[Prompt], WithJsonSchema(_PROMPT_SCHEMA)]
    max_tokens: int | None = Field(default=None, ge=0, description="0 only with echo")
    echo: bool = False
    suffix: Any = None
    best_of: Any = None
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_LOGPROBS,
        description="log probabilities of each token and this many alternatives",
    )

    forbidden: ClassVar[tuple[dict[str, Any], ...]] = (
        {  # max_tokens 0 needs echo
            "required": ["max_tokens"],
            "properties": {"max_tokens": {"const": 0}, "echo": {"const": False}},
        },
        {  # a streamed completion takes one prompt
            "required": ["stream", "prompt"],
            "properties": {
                "stream": {"const": True},
                "prompt": {"type": "array", "minItems": 2, "items": {"type": ["string", "array"]}},
            },
        },
    )

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, value: Any) -> Any:
        """Every accepted shape as a list of prompts, each a string or a list of token ids."""
        if isinstance(value, str):
            return [_non_empty(value)]
        if not isinstance(value, list) or not value:
            raise ValueError(
                "must be a string, a list of strings, a list of token ids or a list of such lists"
            )
        if all(_is_token_id(v) for v in value):
            return [list(value)]
        if len(value) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts are allowed in one request, got {len(value)}")
        prompts: list[Prompt] = []
        for index, item in enumerate(value):
            if isinstance(item, str):
                if not item:
                    raise ValueError(f"prompt {index} is empty; send some text")
                prompts.append(item)
            elif isinstance(item, list) and item and all(_is_token_id(v) for v in item):
                prompts.append(list(item))
            else:
                raise ValueError(
                    f"prompt {index} is neither a non-empty string nor a non-empty list of token ids "
                    "(non-negative integers)"
                )
        return prompts


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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
    grammar: TgiGrammar | None = None
    top_n_tokens: int | None = Field(
        default=None, ge=0, le=MAX_LOGPROBS, description="alternatives per generated token, with details"
    )
    decoder_input_details: bool = Field(
        default=False, description="with details: the prompt's tokens and their log probabilities (prefill)"
    )
    frequency_penalty: Any = None

    unsupported: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {
        "best_of": ((None, 1), "only best_of=1 is supported"),
        "typical_p": ((None, 1), "typical_p is not supported"),
        "truncate": ((None,), "truncate is not supported; shorten the input instead"),
        "watermark": ((None, False), "watermark is not supported"),
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


class TgiCompatRequest(TgiRequest):
    """``POST /``, TGI's route for clients that post to the server's URL itself (Hugging Face's
    ``InferenceClient``): ``stream`` chooses between ``/generate`` and ``/generate_stream``."""

    stream: bool = False
