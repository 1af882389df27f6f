"""`taer serve` as a real uvicorn process on a free local port, spoken to with the official
``openai`` client and plain HTTP. Greedy answers equal direct generation with the same pattern."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
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
