"""Every error the HTTP layer answers, in the OpenAI error shape.

``{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}``, for all routes (the TGI
ones too) and for errors inside a stream (sent as one ``data:`` event). :func:`to_api_error` is
the one mapping from an exception to that shape; the exception handlers, the request guard and the
streaming code all go through it.

Status rules:

- 400: anything wrong with the request body, from invalid JSON and schema violations (pydantic
  errors, converted to a message that names the field; never 422) to impossible values
  (:class:`RequestError`, e.g. a prompt longer than the context). ``param`` is the dotted path of
  the field (``messages.0.role``, ``parameters.max_new_tokens``).
- 401 bad or missing API key; 404 unknown route, model or task; 405 wrong method; 413 body too
  large; 429 queue full; 503 engine loading or the request aborted by the engine; 504 the request
  timed out; 499 the client went away (only ever seen in metrics and logs).
- 500 anything else. A :class:`TaerError` shows its own message (it is written for people); any
  other exception is logged with its traceback and answered with a generic message.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from expert_store.errors import RequestError, TaerError, UnknownTaskError
from server.engine_api import EngineNotReadyError, QueueFullError

logger = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # nginx's convention; no response reaches the client
RETRY_AFTER_S = 1  # what a 429 or 503 asks a client to wait before trying again

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class ClientDisconnectedError(Exception):
    """The client closed the connection before its response was ready (HTTP layer control flow)."""


@dataclass(frozen=True, slots=True)
class ApiError:
    """One error as the client sees it."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    retry_after_s: int | None = None  # sent as Retry-After (429, 503)

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def to_response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        if self.retry_after_s is not None:
            headers = {**(headers or {}), "Retry-After": str(self.retry_after_s)}
        return JSONResponse(self.to_dict(), status_code=self.status, headers=headers)

    def to_sse(self) -> bytes:
        return f"data: {json.dumps(self.to_dict())}\n\n".encode()


def to_api_error(exc: BaseException, request: Request | None = None) -> ApiError:
    """The client-facing form of ``exc``. Logs what the client does not get to see."""
    if isinstance(exc, RequestValidationError):
        return _from_validation_errors(exc.errors())
    if isinstance(exc, HTTPException):
        return _from_http_exception(exc, request)
    if isinstance(exc, ClientDisconnectedError):
        return ApiError(CLIENT_CLOSED_REQUEST, "client disconnected", code="client_disconnected")
    if isinstance(exc, TaerError):
        return _from_taer_error(exc)
    logger.error("unexpected error while serving a request", exc_info=exc)
    return ApiError(500, "internal server error; the server log has the details", code="internal_error")


def _from_taer_error(exc: TaerError) -> ApiError:
    if isinstance(exc, RequestError):
        return ApiError(exc.status, str(exc), param=exc.param)
    if isinstance(exc, UnknownTaskError):
        return ApiError(404, str(exc), param="taer.task", code="task_not_found")
    if isinstance(exc, QueueFullError):
        return ApiError(
            429, str(exc) or "the server is busy; retry later", code="queue_full", retry_after_s=RETRY_AFTER_S
        )
    if isinstance(exc, EngineNotReadyError):
        return ApiError(
            503,
            str(exc) or "the model is still loading; retry later",
            code="engine_not_ready",
            retry_after_s=RETRY_AFTER_S,
        )
    logger.error("engine error while serving a request: %s", exc)
    return ApiError(500, str(exc), code="engine_error")


def _from_http_exception(exc: HTTPException, request: Request | None) -> ApiError:
    where = f"{request.method} {request.url.path}" if request is not None else "this route"
    if exc.status_code == 404:
        return ApiError(404, f"no such route: {where}", code="route_not_found")
    if exc.status_code == 405:
        return ApiError(405, f"method not allowed: {where}", code="method_not_allowed")
    message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    return ApiError(exc.status_code, message, code="request_too_large" if exc.status_code == 413 else None)


def _from_validation_errors(errors: Sequence[Any]) -> ApiError:
    if not errors:
        return ApiError(400, "invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        position = first["loc"][-1] if first.get("loc") else "?"
        return ApiError(400, f"request body is not valid JSON: {detail} (at character {position})".strip())
    param = _dotted(first.get("loc", ()))
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "missing":
        message = "a required field is missing" if param else "a JSON request body is required"
    elif first.get("type") == "model_attributes_type" and param is None:
        message = "the request body must be a JSON object"
    text = f"{param}: {message}" if param else message
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return ApiError(400, text, param=param)


def _dotted(loc: Sequence[Any]) -> str | None:
    parts = list(loc)
    if parts and parts[0] == "body":
        parts = parts[1:]
    return ".".join(str(part) for part in parts) or None


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception a handler can raise through :func:`to_api_error`."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        error = to_api_error(exc, request)
        headers = getattr(exc, "headers", None) if isinstance(exc, HTTPException) else None
        return error.to_response(headers=headers)

    # Any other exception is caught by the request guard in app.py, which answers 500 itself rather
    # than let Starlette's ServerErrorMiddleware re-raise it into the server's log a second time.
    for exc_class in (
        RequestValidationError,
        HTTPException,
        TaerError,
        ClientDisconnectedError,
    ):
        app.add_exception_handler(exc_class, handle)
