"""A real `taer serve --record` process, the whole loop: it records what it serves, `taer calibrate
--refine` updates the patterns from those records, and SIGHUP makes the running server take them
while streams are in flight (all finish whole); a bad directory on SIGHUP is refused in the log and
the old patterns serve on."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from pipeline import TASK_PROMPTS
from tiny_server import tasks_file, tiny_pipeline

from benchmarks.servers import free_port
from retrieval.routing_record import read_records
from server.cli import main

KEY = {"Authorization": "Bearer k3y"}
LONG = {
    "prompt": "abc",
    "max_tokens": 200,
    "ignore_eos": True,
    "temperature": 0,
    "stream": True,
    "stream_options": {"include_usage": True},
}


def _serve(store: Path, patterns: Path, records: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "server", "serve", str(store), "--patterns", str(patterns)]
    command += ["--mode", "exact", "--record", str(records), "--record-text", "--port", str(port)]
    env = {**os.environ, "TAER_KEEP": "0.5", "TAER_SLOTS_PER_LAYER": "8", "TAER_API_KEY": "k3y"}
    with log.open("w") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    _wait(lambda: _healthy(url, process, log), 120, "taer serve did not become ready")
    return process, url


def _healthy(url: str, process: subprocess.Popen, log: Path) -> bool:
    assert process.poll() is None, log.read_text()
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _wait(condition, seconds: float, message: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.1)


def _created(url: str) -> str:
    return httpx.get(f"{url}/v1/taer/patterns", headers=KEY, timeout=30).json()["patterns_created"]


class Stream(threading.Thread):
    """One streaming completion read to its end; ``started`` is set at its first event."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.started, self.events, self.error = url, threading.Event(), [], None

    def run(self) -> None:
        try:
            with httpx.stream(
                "POST", f"{self.url}/v1/completions", json=LONG, headers=KEY, timeout=120
            ) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[6:])
                        self.started.set()
        except httpx.HTTPError as error:
            self.error = error
        finally:
            self.started.set()

    @property
    def num_tokens(self) -> int:
        """The completion tokens the stream's usage chunk reports."""
        return json.loads(self.events[-2])["usage"]["completion_tokens"]


def test_record_refine_and_sighup_reload_while_streams_run(tmp_path):
    store, built = tiny_pipeline()
    patterns, records, log = tmp_path / "patterns", tmp_path / "records", tmp_path / "serve.log"
    shutil.copytree(built, patterns)
    process, url = _serve(store, patterns, records, log)
    try:
        first = _created(url)
        for task, prompts in TASK_PROMPTS.items():
            for prompt in prompts[:4]:
                body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 2}
                answer = httpx.post(f"{url}/v1/chat/completions", json=body, headers=KEY, timeout=60)
                assert answer.json()["taer"]["task"] == task and answer.json()["taer"]["mode"] == "exact"
        _wait(lambda: len(list(read_records(records))) == 8, 30, "the 8 requests were not all recorded")
        argv = ["calibrate", str(store), str(tasks_file()), "--out", str(patterns), "--refine", str(records)]
        assert main([*argv, "--refine-min-requests", "4"]) == 0

        streams = [Stream(url) for _ in range(3)]
        for stream in streams:
            stream.start()
        assert all(stream.started.wait(60) for stream in streams)
        process.send_signal(signal.SIGHUP)
        _wait(lambda: _created(url) != first, 30, "SIGHUP did not reload the refined patterns")
        assert any(stream.is_alive() for stream in streams), "the reload should land mid-stream"
        for stream in streams:
            stream.join(60)
            assert stream.error is None and stream.events[-1] == "[DONE]" and stream.num_tokens == 200
        assert "SIGHUP: now serving the patterns created" in log.read_text()
        refined = _created(url)
        assert json.loads((patterns / "patterns.json").read_text())["created"] == refined

        (patterns / "patterns.json").write_text("{")
        process.send_signal(signal.SIGHUP)
        _wait(lambda: "SIGHUP: patterns not reloaded" in log.read_text(), 30, "no log line for the refusal")
        assert "patterns.json" in log.read_text().split("SIGHUP: patterns not reloaded")[1].splitlines()[0]
        assert _created(url) == refined
        body = {"prompt": "abc", "max_tokens": 2}
        assert httpx.post(f"{url}/v1/completions", json=body, headers=KEY, timeout=60).status_code == 200
        metrics = httpx.get(f"{url}/metrics", headers=KEY, timeout=30).text
        assert 'taer_pattern_reloads_total{outcome="refused"} 1.0' in metrics
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(60) == 0
        finally:
            process.kill()
