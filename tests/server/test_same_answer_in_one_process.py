"""A greedy answer does not depend on what the process did before (issue 18): this process builds,
calibrates and indexes the tiny pipeline (FAISS and torch share one OpenMP runtime here), then
serves it in process through `taer serve`'s own code path, as `taer quickstart` does after preparing
the demo; its answers, from the very first request on, equal those of a fresh `taer serve` process
on the same store and patterns."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from pipeline import build_pipeline

import server.shutdown
from benchmarks.servers import ServerProcess, free_port, taer_spec
from server.cli import serve

pytestmark = pytest.mark.anyio

KEEP, SLOTS = 0.5, 8
GREEDY = {"temperature": 0, "max_tokens": 24, "ignore_eos": True}
PROMPTS = [
    "Reverse the letters of the word garden.",
    "What is 40 plus 47? Add the two numbers.",
    "Reverse the letters of the word candle.",
    "What is 3 plus 10? Add the two numbers.",
]
REQUESTS: list[tuple[str, dict[str, Any]]] = [
    *(("/v1/chat/completions", {"messages": [{"role": "user", "content": p}], **GREEDY}) for p in PROMPTS),
    *(("/v1/completions", {"prompt": p, **GREEDY}) for p in PROMPTS[:2]),
    ("/generate", {"inputs": PROMPTS[2], "parameters": {"max_new_tokens": 24, "do_sample": False}}),
]


def _text(path: str, answer: dict[str, Any]) -> str:
    if path == "/generate":
        return answer["generated_text"]
    choice = answer["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


async def _answers(client: httpx.AsyncClient) -> list[str]:
    texts = []
    for path, body in REQUESTS:
        response = await client.post(path, json=body)
        assert response.status_code == 200, response.text
        texts.append(_text(path, response.json()))
    return texts


def _app_as_taer_serve_builds_it(store: Path, patterns: Path, monkeypatch):
    """The app `taer serve` (and so `taer quickstart`) would hand to uvicorn, captured instead."""
    parser = argparse.ArgumentParser(prog="taer")
    serve.register(parser.add_subparsers())
    flags = ["--patterns", str(patterns), "--keep", str(KEEP), "--slots-per-layer", str(SLOTS)]
    args = parser.parse_args(["serve", str(store), *flags, "--device", "cpu"])
    captured = []
    monkeypatch.setattr(server.shutdown, "serve", lambda app, *_: captured.append(app) or 0)
    assert args.func(args) == 0
    return captured[0]


async def _wait_ready(client: httpx.AsyncClient) -> None:
    for _ in range(600):  # loading runs on the engine thread; a busy machine may take a minute
        if (await client.get("/health")).status_code == 200:
            return
        await anyio.sleep(0.2)
    raise AssertionError("the in-process engine did not become ready")


@pytest.mark.slow
async def test_build_then_serve_in_one_process_answers_as_a_fresh_taer_serve(tmp_path, monkeypatch):
    store, patterns = build_pipeline(tmp_path)  # calibration and the FAISS index, in this process
    app = _app_as_taer_serve_builds_it(store, patterns, monkeypatch)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://taer.test", timeout=120) as client:
            await _wait_ready(client)
            in_process = await _answers(client)
            assert await _answers(client) == in_process  # and later in the same process

    spec = taer_spec(store, patterns, KEEP, free_port(), name="fresh")
    spec = replace(spec, command=[*spec.command, "--slots-per-layer", str(SLOTS)])
    with ServerProcess(spec, tmp_path / "fresh.log") as fresh:
        async with httpx.AsyncClient(base_url=fresh.spec.base_url, timeout=120, trust_env=False) as client:
            assert await _answers(client) == in_process
    assert any(text.strip() for text in in_process)
