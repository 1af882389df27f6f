"""Hostile request bodies (issue 18): lone surrogates, control characters, extreme numbers and odd
keys are answered with a 400 naming the field, or served; never a 5xx. A seeded fuzzer mutates
valid bodies of every POST route through the app with a real Hugging Face tokenizer."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from api_helpers import app_client, assert_openai_error
from fake_engine import FakeEngine
from test_api_hf_tokenizer import hf_tokenizer  # noqa: F401  (the fixture)

pytestmark = pytest.mark.anyio

SURROGATE = "\ud800"
VALID_BODIES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    "/v1/completions": {"prompt": "abc", "max_tokens": 4},
    "/generate": {"inputs": "abc", "parameters": {"max_new_tokens": 4}},
    "/generate_stream": {"inputs": "abc", "parameters": {"max_new_tokens": 4}},
}


async def _post(client, path: str, body: Any):
    # json.dumps escapes a lone surrogate as \ud800, as a hostile client sends it.
    return await client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": SURROGATE}]},
            "messages.0.content",
        ),
        ("/v1/completions", {"prompt": SURROGATE}, "prompt"),
        ("/v1/completions", {"prompt": [f"a{SURROGATE}"]}, "prompt"),
        ("/generate", {"inputs": SURROGATE}, "inputs"),
        ("/generate_stream", {"inputs": "\udfff b"}, "inputs"),
        ("/v1/completions", {"prompt": "a", "stop": ["x", SURROGATE]}, "stop"),
        ("/v1/completions", {"prompt": "a", "model": SURROGATE}, "model"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "a"}], "taer": {"task": SURROGATE}},
            "taer.task",
        ),
    ],
)
async def test_a_lone_surrogate_is_a_400_naming_the_field(hf_tokenizer, path, body, param):  # noqa: F811
    async with app_client(FakeEngine(tokenizer=hf_tokenizer)) as client:
        error = assert_openai_error(await _post(client, path, body), 400, param)
        assert "surrogate" in error["message"]


@pytest.mark.parametrize("text", ["a\x00b", "\x01\x1f\x7f", "\u2028\ufeff", "é€😀"])
async def test_nul_and_control_characters_are_served(hf_tokenizer, text):  # noqa: F811
    async with app_client(FakeEngine(tokenizer=hf_tokenizer)) as client:
        for path, body in VALID_BODIES.items():
            body = json.loads(json.dumps(body))
            key = "messages" if "messages" in body else "prompt" if "prompt" in body else "inputs"
            if key == "messages":
                body["messages"][0]["content"] = text
            else:
                body[key] = text
            response = await _post(client, path, body)
            assert response.status_code == 200, (path, response.text)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "é", "repetition_penalty": 5e-324, "seed": -3}, "repetition_penalty"),
        ({"prompt": "a", "repetition_penalty": 1e308}, "repetition_penalty"),
        ({"prompt": "a", "seed": -(2**70)}, "seed"),
        ({"prompt": "a", "seed": 2**64}, "seed"),
    ],
)
async def test_numbers_the_engine_cannot_honour_are_400(body, param):
    async with app_client(FakeEngine()) as client:
        assert_openai_error(await _post(client, "/v1/completions", body), 400, param)


def _hostile_value(rng: random.Random) -> Any:
    choices = [
        lambda: SURROGATE,
        lambda: "x\x00\x07" + chr(rng.randrange(0x20, 0x3000)),
        lambda: rng.choice([0, -1, 1, 2**63, -(2**64), 2**70]),
        lambda: rng.choice([5e-324, -0.0, 1e308, -1e308, 0.5, 1e-320]),
        lambda: rng.choice([True, False, None]),
        lambda: [rng.choice(["a", SURROGATE, 1, None])] * rng.randrange(0, 20),
        lambda: {rng.choice(["type", "text", SURROGATE, "role"]): rng.choice(["text", 1, SURROGATE])},
        lambda: "",
    ]
    return rng.choice(choices)()


def _mutate(body: Any, rng: random.Random) -> Any:
    """``body`` with one field set (or added) to a hostile value, at any depth."""
    body = json.loads(json.dumps(body))
    node = body
    while True:
        if isinstance(node, dict):
            keys = [
                *node,
                rng.choice(
                    [
                        "seed",
                        "temperature",
                        "top_k",
                        "top_p",
                        "stop",
                        "repetition_penalty",
                        "n",
                        "taer",
                        "odd",
                        SURROGATE,
                        "tool_calls",
                        "name",
                        "stream",
                    ]
                ),
            ]
            key = rng.choice(keys)
        elif isinstance(node, list) and node:
            key = rng.randrange(len(node))
        else:
            return body
        child = node[key] if (isinstance(node, dict) and key in node) or isinstance(node, list) else None
        if isinstance(child, dict | list) and child and rng.random() < 0.6:
            node = child
            continue
        node[key] = _hostile_value(rng)
        return body


FUZZ_CASES = 400


async def test_fuzzed_bodies_never_get_a_5xx(hf_tokenizer):  # noqa: F811
    rng = random.Random(18)
    engine = FakeEngine(tokenizer=hf_tokenizer)
    async with app_client(engine) as client:
        for _ in range(FUZZ_CASES):
            path = rng.choice(list(VALID_BODIES))
            body = _mutate(VALID_BODIES[path], rng)
            for _ in range(rng.randrange(3)):
                body = _mutate(body, rng)
            response = await _post(client, path, body)
            assert response.status_code < 500, (path, body, response.text)
            if response.status_code >= 400:
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"}, response.text
        assert (await client.get("/health")).status_code == 200


async def test_integers_written_with_a_zero_fraction_are_integers():
    # JSON Schema's "integer" holds 16.0, and a client generated from /openapi.json may send it.
    async with app_client(FakeEngine()) as client:
        served = await _post(client, "/v1/completions", {"prompt": "a", "max_tokens": 3.0, "seed": 7.0})
        assert served.status_code == 200, served.text
        assert served.json()["usage"]["completion_tokens"] <= 3
        tgi = await _post(
            client, "/generate", {"inputs": "a", "parameters": {"max_new_tokens": 2.0, "top_k": 5.0}}
        )
        assert tgi.status_code == 200, tgi.text
        for body, param in (
            ({"prompt": "a", "max_tokens": 3.5}, "max_tokens"),
            ({"prompt": "a", "max_tokens": "3"}, "max_tokens"),
            ({"prompt": "a", "seed": 1e300}, "seed"),
            ({"messages": [{"role": "user", "content": "a"}], "top_k": True}, "top_k"),
        ):
            path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            assert_openai_error(await _post(client, path, body), 400, param)
