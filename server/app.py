"""The FastAPI app: routes that only translate, a guard in front of them, and the lifespan.

``create_app(engine, settings)`` builds everything per app (metrics registry, serving objects) and
keeps it on ``app.state``; nothing is global, so tests build as many apps as they like, each with
a fake engine.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.engine_api import Engine, EngineNotReadyError
from server.errors import RETRY_AFTER_S, ApiError, install_error_handlers, to_api_error
from server.metrics import Metrics
from server.openapi import install_openapi
from server.protocol import ChatCompletionRequest, CompletionRequest, TgiCompatRequest, TgiRequest
from server.request_run import Admission, ServingContext
from server.responses import ModelCard, ModelList
from server.serving import ServingChat, ServingCompletion
from server.serving_tgi import ServingTGI
from server.settings import ServerSettings
from server.shutdown import Drain
from server.taer_routes import add_taer_routes
from server.web import add_page_routes, is_page_path

logger = logging.getLogger(__name__)

HEALTH_PATH = "/health"


def create_app(engine: Engine, settings: ServerSettings, metrics: Metrics | None = None) -> FastAPI:
    """The HTTP app serving ``engine``. The lifespan starts the engine (handing it the app's
    :class:`~server.metrics.EngineMetrics`) and shuts it down. ``metrics``: a registry prepared by the
    caller (a cluster's ingress adds its replicas' metrics to it); by default a new one."""
    metrics = metrics or Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start(metrics.engine)
        try:
            yield
        finally:
            await engine.shutdown()

    app = FastAPI(title="taer", summary="Task-adaptive expert retrieval for MoE models", lifespan=lifespan)
    admission = Admission(settings.max_queue, metrics.server)
    context = ServingContext(engine, settings, metrics.server, admission)
    app.state.engine = engine
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.admission = admission
    app.state.drain = Drain()
    app.state.chat = ServingChat(context)
    app.state.completion = ServingCompletion(context)
    app.state.tgi = ServingTGI(context)
    app.state.started = int(time.time())
    _add_routes(app)
    add_taer_routes(app, context)
    add_page_routes(app)
    install_error_handlers(app)
    install_openapi(app, engine)
    known_paths = frozenset(route.path for route in app.routes if hasattr(route, "path"))
    app.add_middleware(
        RequestGuard,
        engine=engine,
        settings=settings,
        metrics=metrics,
        known_paths=known_paths,
        drain=app.state.drain,
    )
    return app


def _add_routes(app: FastAPI) -> None:
    # Directly on the app, not through an APIRouter, so that `app.routes` lists every path (the
    # guard labels metrics with them).
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        return await raw.app.state.chat.create(body, raw)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        return await raw.app.state.completion.create(body, raw)

    @app.post("/generate")
    async def generate(body: TgiRequest, raw: Request) -> Response:
        return await raw.app.state.tgi.generate(body, raw)

    @app.post("/generate_stream")
    async def generate_stream(body: TgiRequest, raw: Request) -> Response:
        return await raw.app.state.tgi.generate_stream(body, raw)

    @app.post("/")
    async def tgi_compat(body: TgiCompatRequest, raw: Request) -> Response:
        tgi = raw.app.state.tgi
        return await (tgi.generate_stream(body, raw) if body.stream else tgi.generate(body, raw))

    @app.get("/v1/models")
    async def models(raw: Request) -> ModelList:
        chat = raw.app.state.chat
        card = ModelCard(
            id=chat.served_model_name, created=raw.app.state.started, max_model_len=chat.engine.max_model_len
        )
        return ModelList(data=[card])

    @app.get("/v1/taer/patterns")
    async def patterns(raw: Request) -> JSONResponse:
        return JSONResponse(raw.app.state.engine.describe())

    @app.get(HEALTH_PATH)
    async def health(raw: Request) -> JSONResponse:
        engine = raw.app.state.engine
        if raw.app.state.drain.is_draining:
            return JSONResponse({"status": "stopping"}, status_code=503, headers={"Retry-After": "1"})
        if not engine.is_ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        try:
            await engine.check_health()
        except Exception:
            logger.exception("engine health check failed")
            return JSONResponse({"status": "unhealthy"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def prometheus(raw: Request) -> Response:
        metrics = raw.app.state.metrics
        return Response(metrics.render(), media_type=metrics.content_type)


class RequestGuard:
    """Pure ASGI middleware in front of every route.

    It refuses, before any body is parsed: any request but ``/health`` while the server stops (503
    with ``Retry-After``), a missing or wrong API key (401; ``/health`` exempt),
    any request but ``/health`` while the engine loads (503), and a declared ``Content-Length``
    over ``max_body_bytes`` (413). It also counts the body as it streams in (a chunked body has no
    length), answers an unexpected exception with a generic 500, and counts every response by
    endpoint and status. The web page's static files (``server/web``) pass like ``/health``:
    they hold no data, and every call the page makes needs the key.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        engine: Engine,
        settings: ServerSettings,
        metrics: Metrics,
        known_paths: frozenset[str],
        drain: Drain,
    ) -> None:
        self.app = app
        self.engine = engine
        self.settings = settings
        self.metrics = metrics.server
        self.known_paths = known_paths
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in self.known_paths else "other"
        status = 500
        response_started = False

        async def recording_send(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal.to_response()(scope, receive, recording_send)
                return
            await self.app(scope, self._limited(receive), recording_send)
        except (ClientDisconnect, OSError):
            logger.debug("client went away during %s", scope["path"])
        except Exception as exc:
            if response_started:  # nothing more can be said to the client
                logger.exception("error after the response started")
            else:
                await to_api_error(exc).to_response()(scope, receive, recording_send)
        finally:
            self.metrics.record_request(endpoint, status)

    def _refusal(self, scope: Scope) -> ApiError | None:
        path, method = scope["path"], scope["method"]
        if path == HEALTH_PATH or (method in ("GET", "HEAD") and is_page_path(path)):  # no data there
            return None
        if self.drain.is_draining:
            return ApiError(
                503,
                "the server is shutting down; retry on another replica or after a restart",
                code="shutting_down",
                retry_after_s=RETRY_AFTER_S,
            )
        headers = dict(scope["headers"])
        if self.settings.api_key is not None and not self._authorized(headers.get(b"authorization", b"")):
            return ApiError(
                401, "missing or wrong API key; send 'Authorization: Bearer <key>'", code="invalid_api_key"
            )
        if not self.engine.is_ready:
            return to_api_error(EngineNotReadyError("the model is still loading; retry shortly"))
        declared = headers.get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.settings.max_body_bytes:
            return self._too_large()
        return None

    def _authorized(self, header: bytes) -> bool:
        scheme, _, key = header.partition(b" ")
        expected = (self.settings.api_key or "").encode()
        return scheme.lower() == b"bearer" and secrets.compare_digest(key.strip(), expected)

    def _limited(self, receive: Receive) -> Receive:
        limit = self.settings.max_body_bytes
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Raised inside FastAPI's body read, which passes HTTPException on to the handlers.
                    raise HTTPException(413, detail=self._too_large().message)
            return message

        return limited_receive

    def _too_large(self) -> ApiError:
        return ApiError(
            413,
            f"the request body is larger than this server's limit of {self.settings.max_body_bytes} bytes",
            code="request_too_large",
        )
