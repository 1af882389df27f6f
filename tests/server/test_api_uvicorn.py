"""End to end over a real socket: uvicorn in a thread, the fake engine, the official ``openai``
client (and plain httpx for the TGI routes and a disconnect)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest
import uvicorn
from fake_engine import FakeEngine

from server.app import create_app
from server.settings import ServerSettings

API_KEY = "sesame"


@dataclass
class LiveServer:
    engine: FakeEngine
    url: str

    def openai(self, api_key: str = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=10)


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    engine = FakeEngine()
    app = create_app(engine, ServerSettings(api_key=API_KEY))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # a free port, held from here on: no race with other processes
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    yield LiveServer(engine, f"http://127.0.0.1:{sock.getsockname()[1]}")
    server.should_exit = True
    thread.join(10)
    sock.close()
    assert engine.stopped  # the lifespan shut the engine down


def test_chat_with_the_openai_client(live):
    raw = live.openai().chat.completions.with_raw_response.create(
        model="fake-moe",
        messages=[{"role": "user", "content": "please sort: c b a"}],
        max_tokens=50,
        extra_body={"taer": {"mode": "exact"}},
    )
    assert raw.headers["x-taer-task"] == "sort"
    assert raw.headers["x-taer-mode"] == "exact"
    completion = raw.parse()
    assert completion.choices[0].message.content == "please sort: c b a"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens == len("please sort: c b a") + 1
    assert completion.model_extra["taer"]["task"] == "sort"


def test_streaming_chat_with_the_openai_client(live):
    stream = live.openai().chat.completions.create(
        model="fake-moe",
        messages=[{"role": "user", "content": "hello"}],
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=4,
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hell"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 4


def test_completions_with_the_openai_client(live):
    client = live.openai()
    completion = client.completions.create(model="fake-moe", prompt="abcdef", max_tokens=3)
    assert (completion.choices[0].text, completion.choices[0].finish_reason) == ("abc", "length")
    streamed = client.completions.create(model="fake-moe", prompt="abc", stream=True, stop=["c"])
    assert "".join(c.choices[0].text for c in streamed) == "ab"
    assert [m.id for m in client.models.list()] == ["fake-moe"]


def test_errors_reach_the_openai_client(live):
    with pytest.raises(openai.AuthenticationError):
        live.openai(api_key="wrong").models.list()
    client = live.openai()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="fake-moe", messages=[{"role": "user", "content": "x"}], temperature=-1
        )
    assert caught.value.param == "temperature"
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(
            model="fake-moe",
            messages=[{"role": "user", "content": "x"}],
            extra_body={"taer": {"task": "poetry"}},
        )
    assert caught.value.code == "task_not_found"
    live.engine.fail_next(RuntimeError("boom"), after_tokens=1)
    stream = client.chat.completions.create(
        model="fake-moe", messages=[{"role": "user", "content": "xyz"}], stream=True
    )
    with pytest.raises(openai.APIError, match="internal server error"):
        list(stream)


def test_tgi_routes_over_http(live):
    headers = {"authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=live.url, headers=headers, timeout=10) as client:
        response = client.post("/generate", json={"inputs": "abc", "parameters": {"details": True}})
        assert response.json()["generated_text"] == "abc"
        assert response.json()["details"]["finish_reason"] == "eos_token"
        with client.stream("POST", "/generate_stream", json={"inputs": "ab"}) as stream:
            lines = [line for line in stream.iter_lines() if line]
        assert len(lines) == 3 and lines[-1].startswith("data: ")
        assert client.get("/health").json() == {"status": "ready"}


def test_disconnecting_streaming_client_aborts(live):
    live.engine.config.token_delay_s = 0.1  # 80 tokens: 8 s to notice the hang-up, however loaded the machine
    try:
        with httpx.Client(base_url=live.url, timeout=10) as client:
            body = {"messages": [{"role": "user", "content": "x" * 150}], "stream": True, "max_tokens": 80}
            headers = {"authorization": f"Bearer {API_KEY}"}
            with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as stream:
                lines = stream.iter_lines()
                assert next(lines).startswith("data: ")
                request_id = live.engine.requests[-1].request_id
            # Leaving the block closes the connection mid-stream.
        deadline = time.monotonic() + 30
        while request_id not in live.engine.aborted:
            assert time.monotonic() < deadline, "the generation was not aborted"
            time.sleep(0.01)
        while live.engine.num_running:
            assert time.monotonic() < deadline, "the generation kept running"
            time.sleep(0.01)
    finally:
        live.engine.config.token_delay_s = 0.0
