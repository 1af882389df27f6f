"""POST /generate and /generate_stream in TGI's shapes."""

from __future__ import annotations

import pytest
from api_helpers import DONE, assert_openai_error, sse_data

pytestmark = pytest.mark.anyio


async def test_generate_without_details(client):
    response = await client.post("/generate", json={"inputs": "abc"})
    assert response.status_code == 200, response.text
    assert response.json() == {
        "generated_text": "abc",
        "taer": {
            "task": "general",
            "similarity": 0.3,
            "confidence": 0.3,
            "mode": "pruned",
            "experts_loaded": 8,
            "experts_reused": 0,
            "replica": None,
        },
    }
    assert response.headers["x-taer-task"] == "general"


@pytest.mark.parametrize(
    ("parameters", "text", "finish_reason", "generated_tokens"),
    [
        ({}, "abcd", "eos_token", 5),
        ({"max_new_tokens": 2}, "ab", "length", 2),
        ({"stop": ["cd"]}, "ab", "stop_sequence", 4),
    ],
)
async def test_generate_details_and_finish_reasons(client, parameters, text, finish_reason, generated_tokens):
    body = {"inputs": "abcd", "parameters": {"details": True, **parameters}}
    response = await client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["generated_text"] == text
    assert response.json()["details"] == {
        "finish_reason": finish_reason,
        "generated_tokens": generated_tokens,
        "seed": None,  # greedy
        "input_length": 5,
    }


async def test_do_sample_false_is_greedy_whatever_the_temperature(client, engine):
    await client.post("/generate", json={"inputs": "a", "parameters": {"temperature": 0.7, "top_k": 4}})
    sampling = engine.requests[-1].sampling
    assert sampling.is_greedy
    assert sampling.seed is None


async def test_do_sample_uses_the_temperature_and_reports_the_seed(client, engine):
    body = {"inputs": "a", "parameters": {"do_sample": True, "temperature": 0.7, "details": True}}
    response = await client.post("/generate", json=body)
    sampling = engine.requests[-1].sampling
    assert sampling.temperature == 0.7
    assert sampling.seed is not None
    assert response.json()["details"]["seed"] == sampling.seed  # reproducible from the response
    body["parameters"]["seed"] = 1234
    response = await client.post("/generate", json=body)
    assert engine.requests[-1].sampling.seed == 1234
    assert response.json()["details"]["seed"] == 1234


async def test_default_max_new_tokens_and_return_full_text(client, engine):
    body = {"inputs": "abc", "parameters": {"return_full_text": True}}
    response = await client.post("/generate", json=body)
    assert response.json()["generated_text"] == "abcabc"
    assert engine.requests[-1].sampling.max_tokens == 100  # TGI's default


async def test_generate_stream(client):
    body = {"inputs": "abc", "parameters": {"details": True, "return_full_text": True}}
    response = await client.post("/generate_stream", json=body)
    assert response.status_code == 200
    assert response.headers["x-taer-task"] == "general"
    events = sse_data(response)
    assert DONE not in events  # TGI's streams end without a marker
    assert [e["index"] for e in events] == [1, 2, 3, 4]
    assert [e["token"]["text"] for e in events] == ["a", "b", "c", ""]
    assert [e["token"]["id"] for e in events] == [97, 98, 99, 2]
    assert [e["token"]["special"] for e in events] == [False, False, False, True]
    assert all(set(e["token"]) == {"id", "text", "logprob", "special"} for e in events)
    assert [e["generated_text"] for e in events] == [None, None, None, "abcabc"]
    assert [e["details"] for e in events[:-1]] == [None, None, None]
    assert events[-1]["details"] == {
        "finish_reason": "eos_token",
        "generated_tokens": 4,
        "seed": None,
        "input_length": 4,
    }
    assert events[0]["taer"]["task"] == "general"
    assert all("taer" not in e for e in events[1:])


async def test_generate_stream_with_a_stop_sequence(client):
    events = sse_data(
        await client.post("/generate_stream", json={"inputs": "abcd", "parameters": {"stop": ["c"]}})
    )
    assert events[-1]["generated_text"] == "ab"
    assert events[-1]["details"]["finish_reason"] == "stop_sequence"


@pytest.mark.parametrize(
    ("parameters", "param"),
    [
        ({"max_new_tokens": 0}, "parameters.max_new_tokens"),
        ({"max_new_tokens": 100_000}, "parameters.max_new_tokens"),
        ({"temperature": -1.0}, "parameters.temperature"),
        ({"top_p": 1.5}, "parameters.top_p"),
        ({"best_of": 2}, "parameters.best_of"),
        ({"grammar": {"type": "xml", "value": {}}}, "parameters.grammar.type"),
        ({"grammar": {"type": "json", "value": "{not json"}}, "parameters.grammar.value"),
        ({"do_sample": "yes"}, "parameters.do_sample"),
    ],
)
async def test_bad_parameters_name_the_field(client, parameters, param):
    response = await client.post("/generate", json={"inputs": "abc", "parameters": parameters})
    assert_openai_error(response, 400, param)


async def test_input_longer_than_the_context(client):
    assert_openai_error(await client.post("/generate", json={"inputs": "x" * 300}), 400, "inputs")
