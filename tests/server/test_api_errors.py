"""Every client mistake is a 4xx in the OpenAI error shape, the server stays healthy, and server
faults are a 500 that says nothing of the internals."""

from __future__ import annotations

import asyncio
import json
import pickle

import pytest
from api_helpers import DONE, app_client, assert_openai_error, chat_body, sse_data
from fake_engine import FakeEngine, FakeEngineConfig

from expert_store.errors import CorruptExpertError, RequestError
from server.engine_api import EngineNotReadyError, QueueFullError
from server.errors import to_api_error
from server.settings import ServerSettings

pytestmark = pytest.mark.anyio

USER = {"role": "user", "content": "hi"}

BAD_CHAT_BODIES = [
    pytest.param(b'{"messages": [', 400, None, id="invalid-json"),
    pytest.param(b"", 400, None, id="no-body"),
    pytest.param(b"[1, 2]", 400, None, id="not-an-object"),
    pytest.param({}, 400, "messages", id="missing-messages"),
    pytest.param({"messages": []}, 400, "messages", id="empty-messages"),
    pytest.param({"messages": "hi"}, 400, "messages", id="messages-not-a-list"),
    pytest.param({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role", id="unknown-role"),
    pytest.param({"messages": [{"content": "x"}]}, 400, "messages.0.role", id="missing-role"),
    pytest.param(
        {"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content", id="content-number"
    ),
    pytest.param(
        {"messages": [{"role": "user", "content": None}]}, 400, "messages.0.content", id="content-null"
    ),
    pytest.param(
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "messages.0.content",
        id="image-part",
    ),
    pytest.param({"messages": [USER], "max_tokens": -1}, 400, "max_tokens", id="negative-max-tokens"),
    pytest.param({"messages": [USER], "max_tokens": 0}, 400, "max_tokens", id="zero-max-tokens"),
    pytest.param({"messages": [USER], "max_tokens": 10**9}, 400, "max_tokens", id="huge-max-tokens"),
    pytest.param(
        {"messages": [USER], "max_completion_tokens": 10**9}, 400, "max_completion_tokens", id="huge-mct"
    ),
    pytest.param({"messages": [USER], "max_tokens": 2.5}, 400, "max_tokens", id="fractional-max-tokens"),
    pytest.param({"messages": [USER], "temperature": -0.1}, 400, "temperature", id="negative-temperature"),
    pytest.param({"messages": [USER], "temperature": "hot"}, 400, "temperature", id="string-temperature"),
    pytest.param({"messages": [USER], "top_p": 0}, 400, "top_p", id="top-p-zero"),
    pytest.param({"messages": [USER], "top_p": 1.5}, 400, "top_p", id="top-p-above-one"),
    pytest.param({"messages": [USER], "top_k": -2}, 400, "top_k", id="top-k-negative"),
    pytest.param(
        {"messages": [USER], "repetition_penalty": 0}, 400, "repetition_penalty", id="rep-penalty-zero"
    ),
    pytest.param({"messages": [USER], "stop": [""]}, 400, "stop", id="empty-stop"),
    pytest.param({"messages": [USER], "stop": 5}, 400, "stop", id="stop-number"),
    pytest.param({"messages": [USER], "n": 0}, 400, "n", id="n-0"),
    pytest.param({"messages": [USER], "n": 17}, 400, "n", id="n-17"),
    pytest.param(
        {"messages": [USER], "presence_penalty": 0.5}, 400, "presence_penalty", id="presence-penalty"
    ),
    pytest.param(
        {"messages": [USER], "frequency_penalty": -1}, 400, "frequency_penalty", id="frequency-penalty"
    ),
    pytest.param({"messages": [USER], "logprobs": 1}, 400, "logprobs", id="logprobs-int"),
    pytest.param({"messages": [USER], "top_logprobs": 2}, 400, "top_logprobs", id="top-logprobs-alone"),
    pytest.param(
        {"messages": [USER], "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", id="top-logprobs-21"
    ),
    pytest.param({"messages": [USER], "tools": [{"type": "function"}]}, 400, "tools", id="tools"),
    pytest.param(
        {"messages": [USER], "response_format": {"type": "xml"}}, 400, "response_format.type", id="format-xml"
    ),
    pytest.param(
        {"messages": [USER], "response_format": {"type": "json_schema"}},
        400,
        "response_format.json_schema",
        id="format-no-schema",
    ),
    pytest.param({"messages": [USER], "stream": "yes"}, 400, "stream", id="stream-string"),
    pytest.param({"messages": [USER], "taer": {"task": "poetry"}}, 404, "taer.task", id="unknown-task"),
    pytest.param({"messages": [USER], "taer": {"mode": "turbo"}}, 400, "taer.mode", id="unknown-mode"),
    pytest.param({"messages": [USER], "taer": {"tsak": "sort"}}, 400, "taer.tsak", id="taer-typo"),
    pytest.param(
        {"messages": [USER], "taer": {"task": "sort", "mode": "full"}}, 400, "taer.task", id="task-and-full"
    ),
    pytest.param({"messages": [USER], "taer": "sort"}, 400, "taer", id="taer-not-an-object"),
    pytest.param({"messages": [USER], "model": "gpt-4o"}, 404, "model", id="unknown-model"),
    pytest.param(
        {"messages": [{"role": "user", "content": "x" * 300}]}, 400, "messages", id="prompt-too-long"
    ),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD_CHAT_BODIES)
async def test_bad_chat_requests(client, engine, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await client.post(
        "/v1/chat/completions", content=content, headers={"content-type": "application/json"}
    )
    error = assert_openai_error(response, status, param)
    if param is not None:
        assert error["message"].startswith(param) or param.split(".")[-1] in error["message"]
    assert engine.requests == []  # refused before reaching the engine
    # The app is still healthy and serving.
    assert (await client.get("/health")).json() == {"status": "ready"}
    assert (await client.post("/v1/chat/completions", json=chat_body())).status_code == 200


async def test_validation_messages_read_well(client):
    response = await client.post(
        "/v1/chat/completions", json={"messages": [{"role": "tool", "content": "x"}]}
    )
    assert (
        response.json()["error"]["message"]
        == "messages.0.role: Input should be 'system', 'user' or 'assistant'"
    )
    response = await client.post(
        "/v1/chat/completions", content=b"{", headers={"content-type": "application/json"}
    )
    assert response.json()["error"]["message"].startswith("request body is not valid JSON")
    response = await client.post("/v1/chat/completions", json={"messages": [USER], "n": 30})
    assert response.json()["error"]["message"] == "n: Input should be less than or equal to 16"


async def test_prompt_too_long_names_the_sizes(client):
    response = await client.post("/v1/chat/completions", json=chat_body("x" * 300))
    error = assert_openai_error(response, 400, "messages")
    assert "256" in error["message"]
    response = await client.post("/v1/chat/completions", json=chat_body("hi", max_tokens=250))
    error = assert_openai_error(response, 400, "max_tokens")
    assert "at most" in error["message"]


async def test_unknown_route_and_wrong_method(client):
    error = assert_openai_error(await client.get("/v2/nothing"), 404)
    assert error["type"] == "not_found_error" and "/v2/nothing" in error["message"]
    error = assert_openai_error(await client.get("/v1/chat/completions"), 405)
    assert "GET" in error["message"]


async def test_api_key(engine):
    async with app_client(engine, ServerSettings(api_key="sesame")) as client:
        for headers in (
            {},
            {"authorization": "Bearer wrong"},
            {"authorization": "sesame"},
            {"authorization": "Basic sesame"},
        ):
            response = await client.post("/v1/chat/completions", json=chat_body(), headers=headers)
            error = assert_openai_error(response, 401)
            assert (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")
        # Refused before anything else is looked at, even an invalid body.
        assert_openai_error(await client.post("/v1/chat/completions", content=b"{"), 401)
        assert_openai_error(await client.get("/v1/models"), 401)
        assert_openai_error(await client.get("/metrics"), 401)
        assert (await client.get("/health")).status_code == 200  # health is exempt
        ok = await client.post(
            "/v1/chat/completions", json=chat_body(), headers={"authorization": "Bearer sesame"}
        )
        assert ok.status_code == 200
        assert len(engine.requests) == 1


async def test_body_too_large_by_content_length(engine):
    async with app_client(engine, ServerSettings(max_body_bytes=2048)) as client:
        response = await client.post("/v1/chat/completions", json=chat_body("x" * 4000))
        error = assert_openai_error(response, 413)
        assert error["code"] == "request_too_large" and "2048" in error["message"]
        assert (await client.post("/v1/chat/completions", json=chat_body("x" * 100))).status_code == 200


async def test_body_too_large_without_content_length(engine):
    async def chunked_body():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"x" * 512
        yield b'"}]}'

    async with app_client(engine, ServerSettings(max_body_bytes=2048)) as client:
        response = await client.post(
            "/v1/chat/completions", content=chunked_body(), headers={"content-type": "application/json"}
        )
        assert "content-length" not in response.request.headers
        assert_openai_error(response, 413)
        assert engine.requests == []
        assert (await client.get("/health")).status_code == 200


async def test_queue_full_in_the_engine_is_429(client, engine):
    engine.fail_next(QueueFullError("the engine queue is full; retry later"))
    error = assert_openai_error(await client.post("/v1/chat/completions", json=chat_body()), 429)
    assert (error["type"], error["code"]) == ("rate_limit_error", "queue_full")
    engine.fail_next(QueueFullError("full"))
    assert_openai_error(await client.post("/v1/chat/completions", json=chat_body(stream=True)), 429)
    assert (await client.post("/v1/chat/completions", json=chat_body())).status_code == 200


async def _wait_until(condition, timeout_s: float = 30.0) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout_s)


async def test_engine_running_at_capacity_is_429(engine):
    engine = FakeEngine(FakeEngineConfig(max_running=1))
    engine.gate = asyncio.Event()  # the first request stays in flight until the gate opens
    async with app_client(engine) as client:
        slow = asyncio.create_task(
            client.post("/v1/completions", json={"prompt": "a slow prompt", "max_tokens": 8})
        )
        await _wait_until(lambda: engine.num_running == 1)
        assert_openai_error(await client.post("/v1/completions", json={"prompt": "b"}), 429)
        engine.gate.set()
        assert (await slow).status_code == 200


async def test_server_max_queue_is_429(engine):
    engine = FakeEngine(FakeEngineConfig(max_running=10))
    engine.gate = asyncio.Event()
    async with app_client(engine, ServerSettings(max_queue=1)) as client:
        slow = asyncio.create_task(client.post("/generate", json={"inputs": "a slow prompt"}))
        await _wait_until(lambda: engine.num_running == 1)
        error = assert_openai_error(await client.post("/generate", json={"inputs": "b"}), 429)
        assert "max_queue" in error["message"]
        engine.gate.set()
        assert (await slow).status_code == 200
        assert (await client.post("/generate", json={"inputs": "b"})).status_code == 200  # the slot came back


async def test_503_while_loading():
    engine = FakeEngine(ready=False)
    async with app_client(engine) as client:
        health = await client.get("/health")
        assert (health.status_code, health.json()) == (503, {"status": "loading"})
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("POST", "/generate")):
            error = assert_openai_error(await client.request(method, path, json=chat_body()), 503)
            assert error["type"] == "service_unavailable_error"
        engine.ready = True
        assert (await client.get("/health")).json() == {"status": "ready"}
        assert (await client.post("/v1/chat/completions", json=chat_body())).status_code == 200


async def test_unhealthy_engine(client, engine):
    engine.healthy = False
    response = await client.get("/health")
    assert (response.status_code, response.json()) == (503, {"status": "unhealthy"})


async def test_unexpected_engine_error_is_a_generic_500(client, engine, caplog):
    engine.fail_next(RuntimeError("secret internals at 0xdeadbeef"))
    error = assert_openai_error(await client.post("/v1/chat/completions", json=chat_body()), 500)
    assert error["type"] == "server_error"
    assert "secret" not in error["message"]
    assert "secret internals" in caplog.text  # logged for the operator
    assert (await client.post("/v1/chat/completions", json=chat_body())).status_code == 200


async def test_domain_error_from_the_engine_keeps_its_message(client, engine):
    engine.fail_next(CorruptExpertError("store/layer_3.safetensors", layer=3, expert=7))
    error = assert_openai_error(await client.post("/generate", json={"inputs": "a"}), 500)
    assert "layer 3, expert 7" in error["message"]


async def test_error_mid_stream_is_an_event_then_done(client, engine):
    engine.fail_next(RuntimeError("boom"), after_tokens=2)
    response = await client.post("/v1/chat/completions", json=chat_body("hello", stream=True))
    assert response.status_code == 200  # the status line went out before the failure
    payloads = sse_data(response)
    assert payloads[-1] == DONE
    contents = [p["choices"][0]["delta"].get("content") for p in payloads[:-2]]
    assert contents == ["", "h", "e"]
    error = payloads[-2]["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "server_error"
    assert "boom" not in error["message"]
    assert (await client.post("/v1/chat/completions", json=chat_body())).status_code == 200


async def test_tgi_error_mid_stream(client, engine):
    engine.fail_next(RuntimeError("boom"), after_tokens=1)
    events = sse_data(await client.post("/generate_stream", json={"inputs": "hello"}))
    assert events[0]["token"]["text"] == "h"
    assert events[-1]["error"]["type"] == "server_error"


async def test_timeout(engine):
    engine = FakeEngine(FakeEngineConfig(token_delay_s=0.05))
    async with app_client(engine, ServerSettings(request_timeout_s=0.2)) as client:
        body = chat_body("x" * 100, max_tokens=100)
        error = assert_openai_error(await client.post("/v1/chat/completions", json=body), 504)
        assert error["type"] == "timeout_error"
        assert engine.aborted == [engine.requests[0].request_id]
        payloads = sse_data(await client.post("/v1/chat/completions", json={**body, "stream": True}))
        assert payloads[-2]["error"]["type"] == "timeout_error"
        assert payloads[-1] == DONE
        assert engine.aborted[-1] == engine.requests[1].request_id
        assert engine.num_running == 0


@pytest.mark.parametrize(
    "error",
    [
        QueueFullError("full; retry later"),
        EngineNotReadyError("still loading"),
        RequestError("bad", param="top_p", status=413),
        CorruptExpertError("shard.safetensors", 1, 2),
    ],
)
def test_serving_errors_cross_processes_whole(error):
    # A cluster's replicas send these through Ray, which pickles them.
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)
    assert to_api_error(copy).to_dict() == to_api_error(error).to_dict()
