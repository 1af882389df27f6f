"""``/openapi.json`` as the server answers: the request models' own schemas, plus what only the
running server knows (the model name it serves, its tasks, its context length), and every error
documented in the OpenAI error shape instead of FastAPI's 422, which this server never sends.

A client generated from this schema sends requests the server accepts; what the schema cannot say
(a prompt whose tokens plus ``max_tokens`` exceed the context; a chat template refusing a
conversation) is stated in the descriptions.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from server import protocol
from server.engine_api import Engine
from server.taer_routes import RouteQuery

_REQUEST_MODELS = (
    protocol.ChatCompletionRequest,
    protocol.ChatMessage,
    protocol.CompletionRequest,
    protocol.StreamOptions,
    protocol.TaerRequest,
    protocol.TgiParameters,
    protocol.TgiRequest,
    protocol.TgiCompatRequest,
    RouteQuery,
)

_ERRORS = {
    "400": "the request body is invalid (the message names the field in `param`)",
    "401": "missing or wrong API key",
    "404": "unknown model or task",
    "413": "the request body is too large",
    "429": "the queue is full; retry after the `Retry-After` seconds",
    "503": "the model is loading or the server is stopping; retry after `Retry-After` seconds",
    "504": "the request ran past its deadline",
}
_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_CONTEXT_NOTE = "The prompt's tokens plus this must fit the model's context of {} tokens."


def install_openapi(app: FastAPI, engine: Engine) -> None:
    """Replaces ``app.openapi`` with the server's schema (completed once the engine is ready, since
    the model name, tasks and context length come from it)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        _exact_request_schemas(schema["components"]["schemas"])
        _document_errors(schema)
        if engine.is_ready:
            _document_engine(schema["components"]["schemas"], engine, app.state.chat.served_model_name)
            app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _exact_request_schemas(components: dict[str, Any]) -> None:
    # FastAPI re-reads pydantic's schemas into models whose bounds are floats, so the seed's
    # 2**64 - 1 came out as 1.8e19, past the limit; pydantic's own schema keeps integers exact.
    for model in _REQUEST_MODELS:
        own = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components[model.__name__]["properties"] = own["properties"]


def _document_errors(schema: dict[str, Any]) -> None:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    components["ErrorResponse"] = _ERROR_SCHEMA
    reference = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for operations in schema["paths"].values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            for status, description in _ERRORS.items():
                responses[status] = {"description": description, "content": reference}


def _document_engine(components: dict[str, Any], engine: Engine, served_model_name: str) -> None:
    names = sorted({served_model_name, engine.model_name})
    tasks = sorted(engine.task_names())
    limit = engine.max_model_len - 1  # at least one prompt token
    for request, length_field in (
        ("ChatCompletionRequest", "max_tokens"),
        ("ChatCompletionRequest", "max_completion_tokens"),
        ("CompletionRequest", "max_tokens"),
        ("TgiParameters", "max_new_tokens"),
    ):
        properties = components[request]["properties"]
        properties[length_field]["anyOf"][0]["maximum"] = limit
        properties[length_field]["description"] = _CONTEXT_NOTE.format(engine.max_model_len)
        if "model" in properties:
            properties["model"] = {
                "anyOf": [{"enum": names}, {"type": "null"}],
                "description": "the served model",
            }
    task = components["TaerRequest"]["properties"]["task"]
    task["anyOf"][0]["enum"] = tasks
    task["description"] = "force this task's pattern (not with mode 'full')"
