"""A real `taer serve` process under SIGTERM and a full queue: after the first signal new requests
get 503 with ``Retry-After`` while the streams in flight finish whole, then the process exits 0; a
second signal exits at once; a full queue answers 429 with ``Retry-After``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from pipeline import build_pipeline

LONG = {"prompt": "abc", "max_tokens": 240, "ignore_eos": True, "temperature": 0, "stream": True}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> tuple[Path, Path]:
    return build_pipeline(tmp_path_factory.mktemp("stop"))


def _serve(pipeline: tuple[Path, Path], *flags: str) -> tuple[subprocess.Popen, str]:
    store, patterns = pipeline
    port = _free_port()
    command = [sys.executable, "-m", "server", "serve", str(store), "--patterns", str(patterns)]
    env = {**os.environ, "TAER_KEEP": "0.5", "TAER_SLOTS_PER_LAYER": "8"}
    log = store.parent / f"serve-{port}.log"  # a file, not a pipe nobody reads that could fill
    with log.open("w") as output:
        process = subprocess.Popen(
            [*command, "--port", str(port), *flags], env=env, stdout=output, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "taer serve did not become ready"
        time.sleep(0.2)


class Stream(threading.Thread):
    """One streaming completion read to its end; ``started`` is set at its first event."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.started, self.events, self.error = url, threading.Event(), [], None

    def run(self) -> None:
        try:
            with httpx.stream("POST", f"{self.url}/v1/completions", json=LONG, timeout=120) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[6:])
                        self.started.set()
        except httpx.HTTPError as error:
            self.error = error
        finally:
            self.started.set()

    def text(self) -> str:
        return "".join(json.loads(e)["choices"][0]["text"] for e in self.events if e != "[DONE]")


def _start_streams(url: str, count: int) -> list[Stream]:
    streams = [Stream(url) for _ in range(count)]
    for stream in streams:
        stream.start()
    for stream in streams:
        assert stream.started.wait(60)
    return streams


def test_sigterm_refuses_new_requests_finishes_streams_and_exits_0(pipeline):
    process, url = _serve(pipeline, "--shutdown-grace", "60")
    try:
        alone = httpx.post(f"{url}/v1/completions", json={**LONG, "stream": False}, timeout=60).json()
        streams = _start_streams(url, 6)
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while True:  # the signal is handled asynchronously; the listener stays open while draining
            refused = httpx.post(f"{url}/v1/completions", json={"prompt": "a"}, timeout=30)
            if refused.status_code == 503 or time.monotonic() > deadline:
                break
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
        assert refused.json()["error"]["code"] == "shutting_down"
        assert httpx.get(f"{url}/health", timeout=30).status_code == 503
        assert process.wait(90) == 0
        for stream in streams:
            stream.join(30)
            assert stream.error is None and stream.events[-1] == "[DONE]"
            assert stream.text() == alone["choices"][0]["text"]  # finished whole, greedy
    finally:
        process.kill()


def test_a_second_signal_exits_at_once(pipeline):
    process, url = _serve(pipeline, "--shutdown-grace", "600")
    try:
        _start_streams(url, 4)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # not a timing assumption: a second signal at any moment must end it
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) != 0
    finally:
        process.kill()


def test_a_full_queue_answers_429_with_retry_after(pipeline):
    process, url = _serve(pipeline, "--max-queue", "2")
    try:
        streams = _start_streams(url, 2)
        answer = httpx.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 2}, timeout=30)
        assert answer.status_code == 429 and answer.headers["retry-after"] == "1", answer.text
        assert answer.json()["error"]["code"] == "queue_full"
        for stream in streams:
            stream.join(60)
    finally:
        process.terminate()
        process.wait(60)
