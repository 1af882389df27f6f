"""The introspection routes beside ``GET /v1/taer/patterns``: what the web page (``server/web``) and
any client read about retrieval and the requests served.

- ``POST /v1/taer/route``: a dry run of a request's route (task, vote, nearest stored examples,
  experts to load); nothing is generated or loaded.
- ``GET /v1/taer/tcess``: every pattern's TCESS table and retained set under the budget, the super
  experts.
- ``GET /v1/taer/requests``: the last requests served, newest first.
- ``POST /v1/taer/reload``: load the patterns directory again (``server/reload.py``); 400 naming
  the fault when it is refused, the old patterns still serving.

They sit behind the same guard as every route (API key, loading, body size).
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.requests import Request

from expert_store.errors import TaerError
from retrieval.overview import PatternTables
from server.errors import ApiError
from server.introspection import RoutePreview
from server.protocol import ChatMessage, TaerRequest, _EdgeModel
from server.recent import RequestRecord
from server.reload import reload_patterns
from server.request_run import ServingContext
from server.serving import ServingBase, _retrieval_text

ROUTE_PATH = "/v1/taer/route"
TCESS_PATH = "/v1/taer/tcess"
REQUESTS_PATH = "/v1/taer/requests"
RELOAD_PATH = "/v1/taer/reload"

# Exactly one of the two texts (null counts as absent), as JSON Schema says it.
_ONE_TEXT_SCHEMA = {
    "oneOf": [
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
    ]
}


class RouteQuery(_EdgeModel):
    """``POST /v1/taer/route``: a text prompt or chat messages (exactly one; retrieval embeds the
    prompt, or the last user message as a chat request's does), and the ``taer`` options the
    request would carry."""

    model_config = ConfigDict(strict=True, extra="ignore", json_schema_extra=_ONE_TEXT_SCHEMA)

    # minLength by a validator, as TgiRequest's inputs (the lone-surrogate check names the field first).
    prompt: str | None = Field(default=None, json_schema_extra={"minLength": 1})
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    taer: TaerRequest | None = None

    @field_validator("prompt", mode="after")
    @classmethod
    def _prompt_has_text(cls, value: str | None) -> str | None:
        if value == "":
            raise ValueError("the prompt is empty; send some text")
        return value

    @model_validator(mode="after")
    def _one_text(self) -> RouteQuery:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of 'prompt' (a text) and 'messages' (a chat)")
        return self

    @property
    def retrieval_text(self) -> str:
        return self.prompt if self.prompt is not None else _retrieval_text(self.messages or [])


class RecentRequestList(BaseModel):
    """The last requests served (at most ``capacity``), newest first; ``num_recorded`` counts every
    request recorded since the server started."""

    requests: list[RequestRecord]
    num_recorded: int
    capacity: int


class ServingRoutePreview(ServingBase):
    """``POST /v1/taer/route``: the ``taer`` options checked as a generation's are, then the engine's
    dry run."""

    async def preview(self, body: RouteQuery) -> RoutePreview:
        return await self.engine.preview_route(body.retrieval_text, self.taer_options(body.taer))


def add_taer_routes(app: FastAPI, context: ServingContext) -> None:
    """Adds the routes, and what they read to ``app.state``."""
    app.state.route_preview = ServingRoutePreview(context)
    app.state.recent = context.recent

    @app.post(ROUTE_PATH, response_model=RoutePreview)
    async def route(body: RouteQuery, raw: Request) -> RoutePreview:
        return await raw.app.state.route_preview.preview(body)

    @app.get(TCESS_PATH, response_model=PatternTables)
    async def tcess(raw: Request) -> PatternTables:
        return raw.app.state.engine.pattern_tables()

    @app.get(REQUESTS_PATH)
    async def requests(raw: Request) -> RecentRequestList:
        recent = raw.app.state.recent
        return RecentRequestList(
            requests=recent.newest_first(), num_recorded=recent.num_recorded, capacity=recent.capacity
        )

    @app.post(RELOAD_PATH)
    async def reload(raw: Request) -> JSONResponse:
        try:
            result = await reload_patterns(raw.app)
        except TaerError as error:
            message = f"patterns not reloaded, the old ones still serve: {error}"
            return ApiError(400, message, code="patterns_not_reloaded").to_response()
        return JSONResponse(result.to_json())
