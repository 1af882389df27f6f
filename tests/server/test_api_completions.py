"""POST /v1/completions against the fake engine."""

from __future__ import annotations

import pytest
from api_helpers import DONE, assert_openai_error, sse_data
from openai.types import Completion

pytestmark = pytest.mark.anyio


async def test_completion_shape(client, engine):
    response = await client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 10})
    assert response.status_code == 200, response.text
    completion = Completion.model_validate(response.json())
    assert completion.id.startswith("cmpl-")
    assert completion.object == "text_completion"
    assert completion.choices[0].text == "abc"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens == 4  # BOS + 3 characters: completions add special tokens
    assert completion.usage.completion_tokens == 4
    assert response.json()["taer"]["task"] == "general"
    assert response.headers["x-taer-task"] == "general"
    assert engine.requests[-1].prompt_token_ids == [1, 97, 98, 99]
    assert engine.requests[-1].retrieval_text == "abc"


async def test_api_default_max_tokens_is_16(client, engine):
    response = await client.post("/v1/completions", json={"prompt": "x" * 40})
    assert response.json()["choices"][0]["finish_reason"] == "length"
    assert response.json()["usage"]["completion_tokens"] == 16
    assert engine.requests[-1].sampling.max_tokens == 16


async def test_a_list_of_one_prompt_is_accepted(client):
    response = await client.post("/v1/completions", json={"prompt": ["abc"]})
    assert response.json()["choices"][0]["text"] == "abc"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": [[1, 2], "a", ""]}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": [-1, 2]}, "prompt"),
        ({"prompt": [[1, True]]}, "prompt"),
        ({"prompt": [0xD800]}, "prompt"),  # beyond the vocabulary
        ({"prompt": ["a"] * 65}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({}, "prompt"),
        ({"prompt": "abc", "best_of": 3}, "best_of"),
        ({"prompt": "abc", "logprobs": 21}, "logprobs"),
        ({"prompt": "abc", "logprobs": True}, "logprobs"),
        ({"prompt": "abc", "echo": "yes"}, "echo"),
        ({"prompt": "abc", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "abc", "n": 17}, "n"),
        ({"prompt": ["a", "b"], "stream": True}, "prompt"),
        ({"prompt": "abc", "suffix": "zzz"}, "suffix"),
    ],
)
async def test_bad_prompts_and_fields_are_refused(client, body, param):
    error = assert_openai_error(await client.post("/v1/completions", json=body), 400, param)
    assert error["type"] == "invalid_request_error"


async def test_an_out_of_vocabulary_token_id_is_named(client):
    response = await client.post("/v1/completions", json={"prompt": [[97], [98, 0xD800]]})
    error = assert_openai_error(response, 400, "prompt")
    assert "prompt 1 holds token id 55296" in error["message"]


async def test_streaming_completion(client):
    body = {"prompt": "hello", "stream": True, "max_tokens": 4, "stream_options": {"include_usage": True}}
    response = await client.post("/v1/completions", json=body)
    assert response.headers["x-taer-mode"] == "pruned"
    payloads = sse_data(response)
    assert payloads[-1] == DONE
    chunks = payloads[:-1]
    # OpenAI's type has no null finish_reason (its client does not validate stream chunks), so only
    # the finishing chunk and the usage chunk are validated with it.
    Completion.model_validate(chunks[-2])
    Completion.model_validate(chunks[-1])
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == "hell"
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None, None, None, "length"]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 6, "completion_tokens": 4, "total_tokens": 10}
    assert all(c["usage"] is None for c in chunks[:-1])
    assert payloads[0]["taer"]["task"] == "general"


async def test_streaming_completion_with_a_stop_string(client):
    payloads = sse_data(
        await client.post("/v1/completions", json={"prompt": "hey you", "stream": True, "stop": [" "]})
    )
    chunks = payloads[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "hey"
    assert Completion.model_validate(chunks[-1]).choices[0].finish_reason == "stop"
    assert all("usage" not in p for p in payloads[:-1])
