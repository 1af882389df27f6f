"""POST /generate and /generate_stream in TGI's shapes."""

from __future__ import annotations

import pytest
from api_helpers import DONE, app_client, assert_openai_error, sse_data
from fake_engine import FakeEngine

from server.settings import ServerSettings

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
            "retrieved_task": None,
            "checked_task": None,
            "rerouted": None,
            "coverage": None,
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
    details = response.json()["details"]
    assert {key: details[key] for key in ("finish_reason", "generated_tokens", "seed", "input_length")} == {
        "finish_reason": finish_reason,
        "generated_tokens": generated_tokens,
        "seed": None,  # greedy
        "input_length": 5,
    }
    assert len(details["tokens"]) == generated_tokens


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


async def test_details_list_tokens_prefill_and_top_tokens(client, engine):
    body = {
        "inputs": "ab",
        "parameters": {
            "max_new_tokens": 5,
            "details": True,
            "decoder_input_details": True,
            "top_n_tokens": 2,
        },
    }
    details = (await client.post("/generate", json=body)).json()["details"]
    # The fake engine's log probabilities: -0.25 per generated token, -1.0 per prompt token.
    assert [(t["id"], t["text"], t["logprob"], t["special"]) for t in details["tokens"]] == [
        (97, "a", -0.25, False),
        (98, "b", -0.25, False),
        (2, "\x02", -0.25, True),  # the end token
    ]
    assert [(t["id"], t["logprob"]) for t in details["prefill"]] == [(1, None), (97, -1.0), (98, -1.0)]
    assert [[t["id"] for t in top] for top in details["top_tokens"]] == [[97, 98], [98, 99], [2, 3]]
    assert engine.requests[-1].sampling.logprobs == 2 and engine.requests[-1].sampling.prompt_logprobs == 0
    plain = (await client.post("/generate", json={"inputs": "ab", "parameters": {"details": True}})).json()
    assert plain["details"]["prefill"] == [] and plain["details"]["top_tokens"] is None
    assert engine.requests[-1].sampling.prompt_logprobs is None
    bare = await client.post("/generate", json={"inputs": "ab"})
    assert "details" not in bare.json() and engine.requests[-1].sampling.logprobs is None


async def test_stream_events_carry_each_tokens_logprob(client):
    body = {"inputs": "ab", "parameters": {"max_new_tokens": 5, "top_n_tokens": 1}}
    events = sse_data(await client.post("/generate_stream", json=body))
    assert [e["token"]["logprob"] for e in events] == [-0.25, -0.25, -0.25]
    assert [[t["id"] for t in e["top_tokens"]] for e in events] == [[97], [98], [2]]
    assert "tokens" not in events[-1]["details"]


async def test_the_root_route_is_tgis_compat_route(client):
    body = {"inputs": "ab", "parameters": {"max_new_tokens": 5, "details": True}}
    plain = await client.post("/", json=body)
    assert plain.json()["generated_text"] == "ab" and plain.json()["details"]["generated_tokens"] == 3
    events = sse_data(await client.post("/", json={**body, "stream": True}))
    assert events[-1]["generated_text"] == "ab" and events[-1]["details"]["finish_reason"] == "eos_token"
    assert (await client.get("/")).headers["content-type"].startswith("text/html")  # the web page


async def test_the_root_route_needs_the_key_though_the_page_does_not():
    async with app_client(FakeEngine(), ServerSettings(api_key="k")) as client:
        assert (await client.get("/")).status_code == 200
        assert_openai_error(await client.post("/", json={"inputs": "ab"}), 401)
        ok = await client.post("/", json={"inputs": "ab"}, headers={"Authorization": "Bearer k"})
        assert ok.status_code == 200
