"""A client that goes away aborts its generation: driven at the ASGI level, where the disconnect
can be timed exactly (httpx's ASGI transport only returns once a response is complete)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from fake_engine import FakeEngine, FakeEngineConfig

from server.app import create_app
from server.settings import ServerSettings

pytestmark = pytest.mark.anyio


class FakeConnection:
    """One HTTP connection as an ASGI server would present it, with a disconnect we control."""

    def __init__(self, path: str, body: dict[str, Any], spec_version: str) -> None:
        self.body = json.dumps(body).encode()
        self.scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": spec_version},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(self.body)).encode()),
            ],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
        }
        self.spec_version = spec_version
        self.sent: list[dict[str, Any]] = []
        self.gone = asyncio.Event()
        self._body_sent = False

    async def receive(self) -> dict[str, Any]:
        if not self._body_sent:
            self._body_sent = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if self.gone.is_set() and self.spec_version >= "2.4":
            raise OSError("connection closed")  # what ASGI 2.4 servers do instead of a disconnect message
        self.sent.append(message)

    def body_messages(self) -> list[dict[str, Any]]:
        return [m for m in self.sent if m["type"] == "http.response.body" and m.get("body")]


async def _wait_for(condition, timeout_s: float = 30.0) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout_s)


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 100}], "stream": True}),
        ("/v1/completions", {"prompt": "x" * 100, "stream": True, "max_tokens": 100}),
        ("/generate_stream", {"inputs": "x" * 100}),
    ],
)
async def test_streaming_client_disconnect_aborts_the_generation(spec_version, path, body):
    engine = FakeEngine(FakeEngineConfig(token_delay_s=0.01))
    app = create_app(engine, ServerSettings())
    async with app.router.lifespan_context(app):
        connection = FakeConnection(path, body, spec_version)
        serving = asyncio.create_task(app(connection.scope, connection.receive, connection.send))
        await _wait_for(lambda: len(connection.body_messages()) >= 3)
        connection.gone.set()
        await asyncio.wait_for(serving, 30)
        [request] = engine.requests
        assert engine.aborted == [request.request_id]
        assert engine.num_running == 0
        assert app.state.admission.num_in_flight == 0
        # It stopped long before the 100 tokens it was asked for.
        assert len(connection.body_messages()) < 50


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 100}]}),
        ("/v1/completions", {"prompt": "x" * 100, "max_tokens": 100}),
        ("/generate", {"inputs": "x" * 100}),
    ],
)
async def test_non_streaming_client_disconnect_aborts_the_generation(path, body):
    engine = FakeEngine(FakeEngineConfig(token_delay_s=0.01))
    engine.gate = asyncio.Event()  # never opened: only the disconnect's abort ends the generation
    app = create_app(engine, ServerSettings())
    async with app.router.lifespan_context(app):
        connection = FakeConnection(path, body, "2.3")
        serving = asyncio.create_task(app(connection.scope, connection.receive, connection.send))
        await _wait_for(lambda: engine.num_running == 1)
        connection.gone.set()
        await asyncio.wait_for(serving, 30)
        [request] = engine.requests
        assert engine.aborted == [request.request_id]
        assert engine.num_running == 0
        assert app.state.admission.num_in_flight == 0
        status = next(m["status"] for m in connection.sent if m["type"] == "http.response.start")
        assert status == 499
        metrics = app.state.metrics.render().decode()
        assert f'taer_http_requests_total{{endpoint="{path}",status="499"}} 1.0' in metrics
