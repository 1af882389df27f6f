"""Log probabilities, echo, n samples, prompt batches and token-id prompts in the OpenAI shapes,
against the fake engine (its log probabilities are made up: -0.25 per generated token, -1.0 per
prompt token, alternatives the next ids). The real engine's values are checked against the
reference model in test_engine_logprobs.py and over HTTP in test_e2e_serve.py."""

from __future__ import annotations

import httpx
import pytest
from api_helpers import DONE, chat_body, sse_data
from fake_engine import FakeEngine, FakeEngineConfig
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from server.app import create_app
from server.settings import ServerSettings

pytestmark = pytest.mark.anyio


async def test_chat_logprobs_and_top_logprobs(client, engine):
    response = await client.post(
        "/v1/chat/completions", json=chat_body("abc", logprobs=True, top_logprobs=2, max_tokens=2)
    )
    chat = ChatCompletion.model_validate(response.json())
    content = chat.choices[0].logprobs.content
    assert [entry.token for entry in content] == ["a", "b"]
    assert [entry.logprob for entry in content] == [-0.25, -0.25]
    assert [t.token for t in content[0].top_logprobs] == ["a", "b"]
    assert content[0].bytes == [97]
    assert engine.requests[-1].sampling.logprobs == 2

    plain = await client.post("/v1/chat/completions", json=chat_body("abc", logprobs=True))
    assert plain.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == []
    off = await client.post("/v1/chat/completions", json=chat_body("abc", logprobs=False))
    assert off.json()["choices"][0]["logprobs"] is None and engine.requests[-1].sampling.logprobs is None


async def test_chat_n_choices_and_usage(client, engine):
    response = await client.post("/v1/chat/completions", json=chat_body("abc", n=3, seed=5))
    chat = ChatCompletion.model_validate(response.json())
    assert [c.index for c in chat.choices] == [0, 1, 2]
    assert all(c.message.content == "abc" for c in chat.choices)
    assert chat.usage.completion_tokens == 3 * 4  # three samples, each "abc" and the end token
    assert engine.requests[-1].sampling.n == 3


async def test_chat_stream_with_n_and_logprobs(client):
    body = chat_body("ab", n=2, stream=True, logprobs=True, stream_options={"include_usage": True})
    payloads = sse_data(await client.post("/v1/chat/completions", json=body))
    assert payloads[-1] == DONE
    chunks = [ChatCompletionChunk.model_validate(p) for p in payloads[:-1]]
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == "ab"
        assert [e.token for c in mine if c.logprobs for e in c.logprobs.content] == ["a", "b", "\x02"]
        assert mine[-1].finish_reason == "stop" and all(c.finish_reason is None for c in mine[:-1])
    assert chunks[-1].usage.completion_tokens == 6


async def test_completion_echo_with_logprobs_scores_the_prompt(client, engine):
    response = await client.post(
        "/v1/completions", json={"prompt": "ab", "echo": True, "logprobs": 1, "max_tokens": 1}
    )
    # The first prompt token has no log probability: null, as OpenAI and vLLM send it (the openai
    # client's type says float, but it does not validate responses).
    choice = response.json()["choices"][0]
    assert choice["text"] == "aba"
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == ["\x01", "a", "b", "a"]  # BOS, the prompt, one generated token
    assert logprobs["token_logprobs"] == [None, -1.0, -1.0, -0.25]
    assert logprobs["top_logprobs"][0] is None and logprobs["top_logprobs"][1] == {"a": -1.0}
    assert logprobs["text_offset"] == [0, 1, 2, 3]
    assert engine.requests[-1].sampling.prompt_logprobs == 1


async def test_completion_echo_with_zero_tokens_returns_the_prompt(client, engine):
    response = await client.post("/v1/completions", json={"prompt": "ab", "echo": True, "max_tokens": 0})
    completion = Completion.model_validate(response.json())
    assert completion.choices[0].text == "ab" and completion.choices[0].logprobs is None
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 0 and completion.usage.prompt_tokens == 3
    scored = await client.post(
        "/v1/completions", json={"prompt": "ab", "echo": True, "max_tokens": 0, "logprobs": 0}
    )
    assert scored.json()["choices"][0]["logprobs"]["token_logprobs"] == [None, -1.0, -1.0]


async def test_completion_logprobs_without_echo_cover_generated_tokens_only(client):
    response = await client.post("/v1/completions", json={"prompt": "ab", "logprobs": 0, "max_tokens": 2})
    logprobs = response.json()["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["a", "b"] and logprobs["token_logprobs"] == [-0.25, -0.25]
    assert logprobs["top_logprobs"] == [{"a": -0.25}, {"b": -0.25}]  # the chosen token is always there


async def test_a_batch_of_prompts_gives_prompt_major_choices(client, engine):
    response = await client.post(
        "/v1/completions", json={"prompt": ["ab", "cd", "ef"], "n": 2, "max_tokens": 2}
    )
    completion = Completion.model_validate(response.json())
    assert [(c.index, c.text) for c in completion.choices] == [
        (0, "ab"),
        (1, "ab"),
        (2, "cd"),
        (3, "cd"),
        (4, "ef"),
        (5, "ef"),
    ]
    assert completion.usage.prompt_tokens == 9 and completion.usage.completion_tokens == 12
    assert [r.retrieval_text for r in engine.requests[-3:]] == ["ab", "cd", "ef"]


async def test_token_id_prompts_are_decoded_for_retrieval_and_echo(client, engine):
    response = await client.post(
        "/v1/completions", json={"prompt": [1, 120, 121], "echo": True, "max_tokens": 2}
    )
    assert response.json()["choices"][0]["text"] == "xyxy"
    assert engine.requests[-1].prompt_token_ids == [1, 120, 121]  # as sent: no second BOS
    assert engine.requests[-1].retrieval_text == "xy"
    batch = await client.post("/v1/completions", json={"prompt": [[104, 105], [111]], "max_tokens": 3})
    assert [c["text"] for c in batch.json()["choices"]] == ["hi", "o"]


async def test_streamed_completion_with_echo_n_and_logprobs(client):
    body = {"prompt": "ab", "echo": True, "n": 2, "logprobs": 0, "max_tokens": 1, "stream": True}
    chunks = sse_data(await client.post("/v1/completions", json=body))[:-1]
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert "".join(c["text"] for c in mine) == "aba"
        assert [t for c in mine for t in c["logprobs"]["token_logprobs"]] == [None, -1.0, -1.0, -0.25]
        assert mine[-1]["finish_reason"] == "length"


async def test_a_failing_prompt_of_a_batch_fails_the_request_and_frees_every_slot():
    engine = FakeEngine(FakeEngineConfig(token_delay_s=0.01))
    app = create_app(engine, ServerSettings(max_queue=3))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://taer.test") as client:
            engine.fail_next(RuntimeError("boom"), after_tokens=1)
            body = {"prompt": ["abcdef", "cdefgh"], "max_tokens": 6}
            assert (await client.post("/v1/completions", json=body)).status_code == 500
            assert app.state.admission.num_in_flight == 0 and engine.num_running == 0
            # The other prompt's generation was aborted, not left running.
            assert sorted(engine.aborted) == sorted(r.request_id for r in engine.requests)
            too_many = await client.post("/v1/completions", json={"prompt": ["a"] * 4})
            assert too_many.status_code == 429 and app.state.admission.num_in_flight == 0
            assert (await client.post("/v1/completions", json=body)).status_code == 200
