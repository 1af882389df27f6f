"""Helpers shared by the HTTP tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fake_engine import FakeEngine, FakeTokenizer

from server.app import create_app
from server.settings import ServerSettings

DONE = "[DONE]"


@asynccontextmanager
async def app_client(
    engine: FakeEngine, settings: ServerSettings | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """A client for a fresh app around ``engine``, lifespan run (so the engine has its metrics)."""
    app = create_app(engine, settings or ServerSettings())
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://taer.test") as client:
            yield client


def chat_body(content: str = "hello", **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], **fields}


def chat_prompt_tokens(*messages: tuple[str, str]) -> int:
    """What the fake tokenizer makes of a conversation: the token count the usage must report."""
    conversation = [{"role": role, "content": content} for role, content in messages]
    return len(FakeTokenizer().apply_chat_template(conversation, add_generation_prompt=True, tokenize=True))


def sse_data(response: httpx.Response) -> list[Any]:
    """The ``data:`` payloads of an SSE body, JSON-decoded, ``[DONE]`` kept as the string.

    Also checks the framing: every event is exactly one ``data: ...`` line followed by a blank line.
    """
    assert response.headers["content-type"].startswith("text/event-stream")
    text = response.text
    assert text.endswith("\n\n"), "an SSE body ends with a blank line"
    payloads = []
    for event in text[:-2].split("\n\n"):
        assert event.startswith("data: ") and "\n" not in event, f"bad SSE event: {event!r}"
        data = event.removeprefix("data: ")
        payloads.append(data if data == DONE else json.loads(data))
    return payloads


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    """The response is an OpenAI-shaped error with this status (and ``param``, if given)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error
