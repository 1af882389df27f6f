"""The HTTP server's settings, checked once at start-up."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from expert_store.errors import RequestError, TaerError
from server.engine_api import SamplingParams


@dataclass(slots=True)
class SamplingDefaults:
    """Server-wide defaults for sampling fields a request leaves out; ``None`` leaves the API's own
    default. Precedence is: the request's value, then these, then the API default (OpenAI chat:
    ``max_tokens`` = what is left of the context; OpenAI completions: 16; TGI: 100; temperature 1,
    top_p 1, top_k off, repetition_penalty 1). A ``serve`` command may fill these from the
    checkpoint's ``generation_config.json``."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None

    def __post_init__(self) -> None:
        # The rules a request's own values meet (SamplingParams), so that a default cannot be
        # something a request is refused for.
        given = {field.name: getattr(self, field.name) for field in fields(self)}
        try:
            SamplingParams(**{name: value for name, value in given.items() if value is not None})
        except RequestError as error:
            raise TaerError(f"invalid server setting defaults.{error.param}: {error}") from None


@dataclass(slots=True)
class ServerSettings:
    """How the HTTP layer behaves. ``host``/``port`` are for whoever runs uvicorn; the app itself
    reads the rest.

    - ``api_key``: when set, every route but ``/health`` needs ``Authorization: Bearer <key>``.
    - ``model_name``: the name served in ``/v1/models`` and accepted in ``model`` (the engine's own
      name is accepted too); ``None`` serves the engine's name.
    - ``max_queue``: generation requests in flight at once (waiting or running); more get 429.
    - ``max_body_bytes``: larger request bodies get 413.
    - ``request_timeout_s``: the most one generation may take, streamed or not, before it is
      aborted (504, or an error event in a stream); ``None`` for no limit.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model_name: str | None = None
    max_queue: int = 256
    max_body_bytes: int = 4 * 1024 * 1024
    request_timeout_s: float | None = 600.0
    defaults: SamplingDefaults = field(default_factory=SamplingDefaults)

    def __post_init__(self) -> None:
        _require(isinstance(self.host, str) and bool(self.host), "host", "a non-empty host name or address")
        _require(_is_int(self.port) and 0 <= self.port <= 65535, "port", "in 0..65535")
        if self.api_key is not None:
            _require(isinstance(self.api_key, str) and bool(self.api_key.strip()), "api_key", "non-empty")
        if self.model_name is not None:
            _require(isinstance(self.model_name, str) and bool(self.model_name), "model_name", "non-empty")
        _require(_is_int(self.max_queue) and self.max_queue >= 1, "max_queue", ">= 1")
        _require(_is_int(self.max_body_bytes) and self.max_body_bytes >= 1024, "max_body_bytes", ">= 1024")
        if self.request_timeout_s is not None:
            _require(
                _is_number(self.request_timeout_s) and self.request_timeout_s > 0,
                "request_timeout_s",
                "> 0 (or None for no limit)",
            )
        _require(isinstance(self.defaults, SamplingDefaults), "defaults", "a SamplingDefaults")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _require(ok: bool, name: str, expected: str) -> None:
    # TaerError so that a `serve` command prints one line and exits 2.
    if not ok:
        raise TaerError(f"invalid server setting {name}: must be {expected}")
