"""`taer serve` as a real uvicorn process on a free local port, spoken to with the official
``openai`` client and plain HTTP. Greedy answers equal direct generation with the same pattern."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
import torch
from pipeline import build_pipeline

from expert_store.runtime import RuntimeConfig, load_runtime
from retrieval.calibrate import load_patterns_for_store
from retrieval.selection import Budget
from retrieval.service import PatternRouter

QUESTION = "What is 4 plus 11? Add the two numbers."


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    store, patterns = build_pipeline(root)
    port = _free_port()
    env = {**os.environ, "TAER_KEEP": "0.5", "TAER_SLOTS_PER_LAYER": "8", "TAER_API_KEY": "k3y"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server",
            "serve",
            str(store),
            "--patterns",
            str(patterns),
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, process.stdout.read()
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "taer serve did not become ready"
        time.sleep(0.2)
    yield url, store, patterns
    process.terminate()
    process.wait(20)


def _direct(store: Path, patterns: Path, task: str, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    router = PatternRouter(load_patterns_for_store(patterns, store), Budget(keep=0.5))
    runtime = load_runtime(store, RuntimeConfig(slots_per_layer=4))
    runtime.activate(router.selection(task), "pruned")
    prompt = torch.tensor([prompt_ids])
    out = runtime.model.generate(
        prompt, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=2, pad_token_id=0
    )
    return out[0, prompt.shape[1] :].tolist()


def test_openai_client_chat_stream_and_completions(served):
    url, store, patterns = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="k3y", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=12, temperature=0
    )
    chat = raw.parse()
    assert raw.headers["x-taer-task"] == "arithmetic" and raw.headers["x-taer-mode"] == "pruned"
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage.completion_tokens > 0

    tokenizer = load_runtime(store).tokenizer
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    expected = tokenizer.decode(_direct(store, patterns, "arithmetic", ids, 12), skip_special_tokens=True)
    assert chat.choices[0].message.content == expected

    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens

    completion = client.completions.create(
        model=model, prompt="Reverse the letters of the word apple.", max_tokens=5, temperature=0
    )
    assert completion.choices[0].finish_reason == "length" or completion.usage.completion_tokens < 5


def test_tgi_generate_and_stream(served):
    url, _, _ = served
    headers = {"Authorization": "Bearer k3y"}
    body = {
        "inputs": "Reverse the letters of the word stone.",
        "parameters": {"max_new_tokens": 8, "details": True},
    }
    reply = httpx.post(f"{url}/generate", json=body, headers=headers, timeout=60)
    assert reply.status_code == 200 and reply.json()["details"]["generated_tokens"] <= 8
    streamed = ""
    with httpx.stream("POST", f"{url}/generate_stream", json=body, headers=headers, timeout=60) as response:
        events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]
    streamed = "".join(e["token"]["text"] for e in events if not e["token"]["special"])
    assert events[-1]["generated_text"] == reply.json()["generated_text"] == streamed


def test_eight_clients_at_once_and_a_disconnect(served):
    url, _, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="k3y", max_retries=0, timeout=60)
    questions = [
        QUESTION,
        "Reverse the letters of the word tiger.",
        "What is 30 plus 37?",
        "Reverse the word music.",
    ]

    def ask(text: str) -> str:
        reply = client.chat.completions.create(
            model="ckpt", messages=[{"role": "user", "content": text}], max_tokens=10, temperature=0
        )
        return reply.choices[0].message.content

    alone = [ask(q) for q in questions]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, questions * 2))
    assert together == alone * 2

    body = {
        "model": "ckpt",
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 500,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer k3y"}, timeout=60
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                break  # hang up after the first chunk
    deadline = time.monotonic() + 20
    while True:
        state = httpx.get(f"{url}/v1/taer/patterns", headers={"Authorization": "Bearer k3y"}).json()
        metrics = httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer k3y"}).text
        if "taer_requests_running 0.0" in metrics:
            break
        assert time.monotonic() < deadline, "the disconnected generation did not stop"
        time.sleep(0.1)
    assert state["cache"]["hits"] > 0 and httpx.get(f"{url}/health").status_code == 200
    assert (
        httpx.post(
            f"{url}/v1/chat/completions", json={"messages": []}, headers={"Authorization": "Bearer no"}
        ).status_code
        == 401
    )


def test_openai_client_logprobs_samples_and_json_schema(served):
    """Log probabilities equal log_softmax of the reference model's logits under the same pattern
    (within 1e-4: batched and KV-cached against one plain forward); n=3 with a seed is reproducible;
    every sample of a json_schema request parses and validates."""
    url, store, patterns = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="k3y", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": QUESTION}]
    chat = client.chat.completions.create(
        model="ckpt", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    tokenizer = load_runtime(store).tokenizer
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    generated = _direct(store, patterns, chat.model_extra["taer"]["task"], ids, 6)
    reference = _reference_logprobs(store, patterns, chat.model_extra["taer"]["task"], ids + generated)
    entries = chat.choices[0].logprobs.content
    assert len(entries) == len(generated)
    for step, (entry, token) in enumerate(zip(entries, generated, strict=True)):
        row = reference[len(ids) - 1 + step]
        assert entry.logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(
            torch.topk(row, 3).values.tolist(), abs=1e-4
        )

    # The prompt scored through /v1/completions, as lm-eval's log-likelihood requests do.
    scored = client.completions.create(model="ckpt", prompt=ids, max_tokens=0, echo=True, logprobs=1)
    token_logprobs = scored.choices[0].logprobs.token_logprobs
    assert token_logprobs[0] is None and len(token_logprobs) == len(ids)
    prompt_reference = _reference_logprobs(store, patterns, scored.model_extra["taer"]["task"], ids)
    expected = [prompt_reference[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    assert token_logprobs[1:] == pytest.approx(expected, abs=1e-4)

    def three_samples():
        reply = client.chat.completions.create(
            model="ckpt", messages=messages, max_tokens=8, temperature=1.0, seed=42, n=3
        )
        return [c.message.content for c in reply.choices], reply.usage.completion_tokens

    first, second = three_samples(), three_samples()
    assert first == second and len(first[0]) == 3 and len(set(first[0])) > 1

    schema = {
        "type": "object",
        "properties": {"task": {"enum": ["add", "reverse"]}, "ok": {"type": "boolean"}},
        "required": ["task", "ok"],
        "additionalProperties": False,
    }
    structured = client.chat.completions.create(
        model="ckpt",
        messages=messages,
        max_tokens=80,
        temperature=1.0,
        seed=3,
        n=3,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
    )
    for choice in structured.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)

    tgi = httpx.post(
        f"{url}/generate",
        json={
            "inputs": QUESTION,
            "parameters": {"max_new_tokens": 10, "grammar": {"type": "regex", "value": "[0-9]{3}"}},
        },
        headers={"Authorization": "Bearer k3y"},
        timeout=60,
    )
    assert re.fullmatch("[0-9]{3}", tgi.json()["generated_text"]), tgi.text
    refused = httpx.post(
        f"{url}/v1/chat/completions",
        json={
            "messages": messages,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "nonsense"}},
            },
        },
        headers={"Authorization": "Bearer k3y"},
        timeout=60,
    )
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "response_format", refused.text


def _reference_logprobs(store: Path, patterns: Path, task: str, ids: list[int]) -> torch.Tensor:
    router = PatternRouter(load_patterns_for_store(patterns, store), Budget(keep=0.5))
    runtime = load_runtime(store, RuntimeConfig(slots_per_layer=4))
    runtime.activate(router.selection(task), "pruned")
    with torch.inference_mode():
        logits = runtime.model(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def test_hugging_face_inference_client_through_tgis_routes(served, monkeypatch):
    """huggingface_hub's InferenceClient posts to the server's URL itself (TGI's compat route),
    streaming or not, and parses details with each token's log probability."""
    import huggingface_hub.constants
    from huggingface_hub import InferenceClient

    # Offline mode (when set) refuses every URL, this loopback one too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    url, _, _ = served
    client = InferenceClient(model=url, token="k3y")
    prompt = f"<user>{QUESTION}\n<assistant>"
    whole = client.text_generation(prompt, max_new_tokens=8, details=True, decoder_input_details=True)
    assert whole.details.generated_tokens == len(whole.details.tokens) > 0
    assert all(t.logprob <= 0 for t in whole.details.tokens)
    assert whole.details.prefill[0].logprob is None and len(whole.details.prefill) > 1
    streamed = list(client.text_generation(prompt, max_new_tokens=8, details=True, stream=True))
    assert streamed[-1].generated_text == whole.generated_text
    assert [e.token.logprob for e in streamed] == pytest.approx(
        [t.logprob for t in whole.details.tokens], abs=1e-5
    )
    assert client.text_generation(prompt, max_new_tokens=8) == whole.generated_text
