"""POST /v1/chat/completions against the fake engine: shapes, streaming, finish reasons, taer."""

from __future__ import annotations

import time

import pytest
from api_helpers import DONE, app_client, assert_openai_error, chat_body, chat_prompt_tokens, sse_data
from fake_engine import FakeEngine, FakeEngineConfig
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from server.settings import SamplingDefaults, ServerSettings

pytestmark = pytest.mark.anyio


async def test_chat_completion_shape_usage_and_taer(client, engine):
    before = int(time.time())
    response = await client.post("/v1/chat/completions", json=chat_body("sort these: b a"))
    after = int(time.time())
    assert response.status_code == 200, response.text
    completion = ChatCompletion.model_validate(response.json())
    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert before <= completion.created <= after  # wall clock, not a monotonic clock
    assert completion.model == "fake-moe"
    [choice] = completion.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == "sort these: b a"
    assert choice.finish_reason == "stop"
    assert completion.usage.prompt_tokens == chat_prompt_tokens(("user", "sort these: b a"))
    assert completion.usage.completion_tokens == len("sort these: b a") + 1  # the end-of-sequence token
    assert (
        completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    )
    assert response.json()["taer"] == {
        "task": "sort",
        "similarity": 0.9,
        "confidence": 0.9,
        "mode": "pruned",
        "experts_loaded": 8,
        "experts_reused": 0,
        "replica": None,
        "retrieved_task": None,
        "checked_task": None,
        "rerouted": None,
        "coverage": None,
    }
    assert response.headers["x-taer-task"] == "sort"
    assert "x-taer-replica" not in response.headers  # one process
    assert "x-taer-rerouted" not in response.headers  # the router check did not run
    assert response.headers["x-taer-similarity"] == "0.9000"
    assert response.headers["x-taer-mode"] == "pruned"
    assert response.headers["x-taer-experts-loaded"] == "8"
    assert engine.requests[-1].retrieval_text == "sort these: b a"


async def test_second_request_on_the_same_task_reuses_experts(client):
    await client.post("/v1/chat/completions", json=chat_body("sort it"))
    response = await client.post("/v1/chat/completions", json=chat_body("sort again"))
    assert response.json()["taer"]["experts_loaded"] == 0
    assert response.json()["taer"]["experts_reused"] == 8
    assert response.headers["x-taer-experts-loaded"] == "0"


async def test_finish_reason_length(client):
    response = await client.post("/v1/chat/completions", json=chat_body("hello", max_tokens=3))
    completion = ChatCompletion.model_validate(response.json())
    assert completion.choices[0].message.content == "hel"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 3


@pytest.mark.parametrize(
    ("stop", "content", "finish_reason"),
    [("ll", "he", "stop"), (["xyz", "lo"], "hel", "stop"), ("lox", "hello", "stop"), ("h", "", "stop")],
)
async def test_stop_strings_end_generation_and_are_not_returned(client, stop, content, finish_reason):
    response = await client.post("/v1/chat/completions", json=chat_body("hello", stop=stop))
    choice = response.json()["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == (content, finish_reason)


async def test_text_parts_are_joined_and_the_last_user_message_is_retrieved(client, engine):
    body = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "reverse abc"},
        ]
    }
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    expected = chat_prompt_tokens(
        ("system", "be brief"), ("user", "a\nb"), ("assistant", "ok"), ("user", "reverse abc")
    )
    assert response.json()["usage"]["prompt_tokens"] == expected
    assert engine.requests[-1].retrieval_text == "reverse abc"
    assert response.json()["taer"]["task"] == "reverse"


async def test_forced_task_and_mode(client, engine):
    response = await client.post(
        "/v1/chat/completions", json=chat_body("hello", taer={"task": "sort", "mode": "exact"})
    )
    assert response.status_code == 200, response.text
    taer = response.json()["taer"]
    assert (taer["task"], taer["mode"], taer["similarity"]) == ("sort", "exact", None)
    assert response.headers["x-taer-task"] == "sort"
    assert response.headers["x-taer-mode"] == "exact"
    assert "x-taer-similarity" not in response.headers  # no retrieval ran
    assert engine.requests[-1].taer.task == "sort"
    assert engine.requests[-1].taer.mode == "exact"


async def test_full_mode_uses_no_pattern(client):
    response = await client.post("/v1/chat/completions", json=chat_body("sort it", taer={"mode": "full"}))
    assert response.json()["taer"]["task"] is None
    assert response.json()["taer"]["mode"] == "full"
    assert "x-taer-task" not in response.headers


async def test_streaming_framing_and_chunks(client, engine):
    response = await client.post("/v1/chat/completions", json=chat_body("hello", stream=True))
    assert response.status_code == 200
    assert response.headers["x-taer-task"] == "general"
    payloads = sse_data(response)
    assert payloads[-1] == DONE
    chunks = [ChatCompletionChunk.model_validate(p) for p in payloads[:-1]]
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert payloads[0]["taer"]["task"] == "general"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "hello"
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    assert all("usage" not in p for p in payloads[:-1])  # not asked for
    assert engine.aborted == []  # a stream that ran to its end is not aborted


async def test_streaming_include_usage_and_length(client):
    body = chat_body("hello", stream=True, max_tokens=2, stream_options={"include_usage": True})
    payloads = sse_data(await client.post("/v1/chat/completions", json=body))
    assert payloads[-1] == DONE
    chunks = [ChatCompletionChunk.model_validate(p) for p in payloads[:-1]]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == 2
    assert usage_chunk.usage.prompt_tokens == chat_prompt_tokens(("user", "hello"))
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == "he"


async def test_streaming_stop_string_held_back(client):
    payloads = sse_data(
        await client.post("/v1/chat/completions", json=chat_body("abcabd", stream=True, stop="abd"))
    )
    chunks = [ChatCompletionChunk.model_validate(p) for p in payloads[:-1]]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "abc"
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("defaults", "body", "expected"),
    [
        # API defaults: temperature 1, top_p 1, top_k off, max_tokens = what the context leaves.
        (SamplingDefaults(), {}, {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}),
        # Server defaults beat API defaults...
        (
            SamplingDefaults(temperature=0.3, top_k=5, max_tokens=7),
            {},
            {"temperature": 0.3, "top_k": 5, "max_tokens": 7},
        ),
        # ...and the request beats both; top_k -1 means off.
        (
            SamplingDefaults(temperature=0.3, top_k=5, max_tokens=7),
            {"temperature": 0.9, "top_k": -1, "max_tokens": 4, "seed": 11, "repetition_penalty": 1.2},
            {"temperature": 0.9, "top_k": 0, "max_tokens": 4, "seed": 11, "repetition_penalty": 1.2},
        ),
        # max_completion_tokens wins over max_tokens.
        (SamplingDefaults(), {"max_tokens": 9, "max_completion_tokens": 3}, {"max_tokens": 3}),
        (SamplingDefaults(), {"stop": "x", "ignore_eos": True}, {"stop": ("x",), "ignore_eos": True}),
    ],
)
async def test_sampling_precedence(defaults, body, expected):
    engine = FakeEngine()
    async with app_client(engine, ServerSettings(defaults=defaults)) as client:
        response = await client.post("/v1/chat/completions", json=chat_body("hi", **body))
    assert response.status_code == 200, response.text
    sampling = engine.requests[-1].sampling
    for name, value in expected.items():
        assert getattr(sampling, name) == value, name


async def test_default_max_tokens_is_cut_to_the_context():
    engine = FakeEngine(FakeEngineConfig(max_model_len=64))
    async with app_client(engine, ServerSettings(defaults=SamplingDefaults(max_tokens=1000))) as client:
        response = await client.post("/v1/chat/completions", json=chat_body("hi"))
    assert response.status_code == 200, response.text
    prompt_tokens = chat_prompt_tokens(("user", "hi"))
    assert engine.requests[-1].sampling.max_tokens == 64 - prompt_tokens


async def test_model_names(client):
    assert (await client.post("/v1/chat/completions", json=chat_body(model="fake-moe"))).status_code == 200
    error = assert_openai_error(
        await client.post("/v1/chat/completions", json=chat_body(model="gpt-4")), 404, "model"
    )
    assert "fake-moe" in error["message"]


async def test_served_model_name_from_settings():
    async with app_client(FakeEngine(), ServerSettings(model_name="taer-demo")) as client:
        response = await client.post("/v1/chat/completions", json=chat_body(model="taer-demo"))
        assert response.json()["model"] == "taer-demo"
        # The engine's own name stays accepted.
        assert (
            await client.post("/v1/chat/completions", json=chat_body(model="fake-moe"))
        ).status_code == 200
        assert (await client.get("/v1/models")).json()["data"][0]["id"] == "taer-demo"


async def test_reverse_script(client, engine):
    engine.config.script = "reverse"
    response = await client.post("/v1/chat/completions", json=chat_body("abc"))
    assert response.json()["choices"][0]["message"]["content"] == "cba"
