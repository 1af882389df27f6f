"""`taer serve --replicas 2` on a local Ray instance, against the single-process `taer serve` on the
same store: the same API and greedy answers through the official openai client, task affinity read
from the replicas' metrics, bad input refused at the ingress, and a replica killed mid-stream."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict

import httpx
import openai
import pytest
from pipeline import build_pipeline

pytest.importorskip("ray.serve")

KEY = "k3y"
HEADERS = {"Authorization": f"Bearer {KEY}"}
ARITHMETIC = "What is 4 plus 11? Add the two numbers."
REVERSE = "Reverse the letters of the word apple."


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(store, patterns, *extra: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "TAER_KEEP": "0.5", "TAER_SLOTS_PER_LAYER": "4", "TAER_API_KEY": KEY}
    # A request waits this long for a busy replica holding its task before another takes it (Ray's
    # default 1 s is about as long as a flooding request runs here: spill-over would hang on timing).
    env["RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S"] = "0.1"
    command = [sys.executable, "-m", "server", "serve", str(store), "--patterns", str(patterns)]
    process = subprocess.Popen(
        [*command, "--port", str(port), *extra],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    return process, f"http://127.0.0.1:{port}"


def _wait_ready(process: subprocess.Popen, url: str, deadline_s: float = 240) -> None:
    deadline = time.monotonic() + deadline_s
    while True:
        assert process.poll() is None, "the server exited while starting"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the server did not become ready"
        time.sleep(0.5)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server alone, as `docker stop` sends it (sent to the whole group it would reach
    the local Ray instance's own processes too); then whatever is left of its group is killed."""
    if process.poll() is None:
        process.terminate()
        try:
            assert process.wait(90) == 0, "the server did not stop cleanly"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    store, patterns = build_pipeline(tmp_path_factory.mktemp("cluster"))
    cluster, cluster_url = _start(store, patterns, "--replicas", "2", "--replica-max-ongoing", "2")
    single, single_url = _start(store, patterns)
    try:
        _wait_ready(single, single_url)
        _wait_ready(cluster, cluster_url)
        yield cluster_url, single_url
    finally:
        try:
            _stop(cluster)
        finally:
            _stop(single)


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)


def _chat(url: str, text: str, **extra) -> str:
    reply = _client(url).chat.completions.create(
        model="ckpt", messages=[{"role": "user", "content": text}], max_tokens=12, temperature=0, **extra
    )
    return reply.choices[0].message.content


def _replica_requests(url: str) -> dict[str, dict[str, float]]:
    """task -> replica -> requests served, from the ingress's /metrics."""
    served: dict[str, dict[str, float]] = defaultdict(dict)
    text = httpx.get(f"{url}/metrics", headers=HEADERS, timeout=10).text
    pattern = r'^taer_replica_requests_total\{replica="([^"]+)",task="([^"]+)"\} (\S+)$'
    for replica, task, value in re.findall(pattern, text, re.MULTILINE):
        served[task][replica] = float(value)
    return served


def _until(check, deadline_s: float = 30.0):
    deadline = time.monotonic() + deadline_s
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


def test_answers_equal_the_single_process(servers):
    cluster, single = servers
    for text in (ARITHMETIC, REVERSE, "hello there"):
        assert _chat(cluster, text) == _chat(single, text)
    streamed = _client(cluster).chat.completions.create(
        model="ckpt",
        messages=[{"role": "user", "content": REVERSE}],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == _chat(single, REVERSE)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    completion = {
        "model": "ckpt",
        "prompt": "<user>Reverse stone\n<assistant>",
        "max_tokens": 8,
        "temperature": 0.8,
        "seed": 5,
        "n": 2,
        "echo": True,
        "logprobs": 2,
    }
    a = httpx.post(f"{cluster}/v1/completions", json=completion, headers=HEADERS, timeout=60)
    b = httpx.post(f"{single}/v1/completions", json=completion, headers=HEADERS, timeout=60)
    assert a.status_code == b.status_code == 200
    assert [c["text"] for c in a.json()["choices"]] == [c["text"] for c in b.json()["choices"]]
    for mine, theirs in zip(a.json()["choices"], b.json()["choices"], strict=True):
        assert mine["logprobs"]["token_logprobs"][1:] == pytest.approx(
            theirs["logprobs"]["token_logprobs"][1:], abs=1e-5
        )
    assert a.headers["x-taer-task"] == b.headers["x-taer-task"]
    tgi = {"inputs": f"<user>{ARITHMETIC}\n<assistant>", "parameters": {"max_new_tokens": 8}}
    a = httpx.post(f"{cluster}/generate", json=tgi, headers=HEADERS, timeout=60)
    b = httpx.post(f"{single}/generate", json=tgi, headers=HEADERS, timeout=60)
    assert a.status_code == 200 and a.json()["generated_text"] == b.json()["generated_text"]


def test_bad_input_is_refused_at_the_ingress_as_by_the_single_process(servers):
    cluster, single = servers
    cases = [
        ({"messages": []}, HEADERS),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, HEADERS),
        ({"messages": [{"role": "user", "content": "x"}], "taer": {"task": "nope"}}, HEADERS),
        ({"messages": [{"role": "user", "content": "x"}]}, {}),
    ]
    for body, headers in cases:
        a = httpx.post(f"{cluster}/v1/chat/completions", json=body, headers=headers, timeout=30)
        b = httpx.post(f"{single}/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert a.status_code == b.status_code and 400 <= a.status_code < 500
        assert a.json()["error"]["param"] == b.json()["error"]["param"]


def test_the_web_page_and_its_data_come_from_the_ingress(servers):
    cluster, single = servers
    page = httpx.get(f"{cluster}/", timeout=10)  # public, like the single process's
    assert page.status_code == 200 and "/ui/app.js" in page.text
    tables = [httpx.get(f"{url}/v1/taer/tcess", headers=HEADERS, timeout=30).json() for url in servers]
    assert tables[0] == tables[1] and [p["task"] for p in tables[0]["patterns"]][-1] == "general"
    _chat(cluster, ARITHMETIC)

    def preview(url: str) -> dict:
        body = {"prompt": ARITHMETIC}
        return httpx.post(f"{url}/v1/taer/route", json=body, headers=HEADERS, timeout=30).json()

    # Once the replicas have reported, the dry run compares with the one now holding arithmetic.
    shown = _until(lambda: (p := preview(cluster))["num_to_load"] == 0 and p)
    assert shown, preview(cluster)
    alone = preview(single)
    assert shown["task"] == alone["task"] == "arithmetic" and shown["experts"] == alone["experts"]
    assert shown["replica"] in {r["replica"] for r in _replicas(cluster)}
    (last, *_) = httpx.get(f"{cluster}/v1/taer/requests", headers=HEADERS, timeout=10).json()["requests"]
    assert last["task"] == "arithmetic" and last["replica"] and last["completion_tokens"] > 0


def _replicas(url: str) -> list[dict]:
    return httpx.get(f"{url}/v1/taer/patterns", headers=HEADERS, timeout=10).json()["replicas"]


def test_each_task_goes_to_its_own_replica(servers):
    cluster, _ = servers
    before = _replica_requests(cluster)
    for _ in range(10):
        _chat(cluster, ARITHMETIC)
        _chat(cluster, REVERSE)

    def counted():
        served = _replica_requests(cluster)
        added = {
            task: {r: n - before.get(task, {}).get(r, 0) for r, n in served.get(task, {}).items()}
            for task in ("arithmetic", "reverse")
        }
        return added if all(sum(added[t].values()) >= 10 for t in added) else None

    added = _until(counted)
    assert added, "the replicas did not report the requests"
    home = {task: max(per_replica, key=per_replica.get) for task, per_replica in added.items()}
    assert home["arithmetic"] != home["reverse"], added
    for task, per_replica in added.items():
        assert per_replica[home[task]] >= 8, added  # the first of each may land anywhere


def test_a_replica_killed_mid_stream_ends_its_request_and_the_others_serve(servers):
    cluster, _ = servers
    body = {
        "messages": [{"role": "user", "content": REVERSE}],
        "max_tokens": 190,
        "ignore_eos": True,
        "stream": True,
        "taer": {"task": "reverse"},
    }
    replicas = httpx.get(f"{cluster}/v1/taer/patterns", headers=HEADERS, timeout=10).json()["replicas"]
    pids = {r["replica"]: r["pid"] for r in replicas}
    events = []
    started = time.monotonic()
    with httpx.stream(
        "POST", f"{cluster}/v1/chat/completions", json=body, headers=HEADERS, timeout=60
    ) as response:
        assert response.status_code == 200
        victim = response.headers["x-taer-replica"]  # the replica serving this stream
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            events.append(line)
            if len(events) == 3:
                os.kill(pids[victim], signal.SIGKILL)
    assert time.monotonic() - started < 60
    assert any('"error"' in event for event in events[3:]), events[-3:]
    assert '"finish_reason":"length"' not in "".join(events)
    # The other replica serves at once; the killed one is restarted by Ray Serve.
    assert _chat(cluster, ARITHMETIC)
    assert _chat(cluster, REVERSE, extra_body={"taer": {"task": "reverse"}})
    # Ray Serve restarts the killed replica: two replicas report again, the victim's pid gone.
    deadline = time.monotonic() + 180
    while True:
        replicas = httpx.get(f"{cluster}/v1/taer/patterns", headers=HEADERS, timeout=10).json()["replicas"]
        if len(replicas) == 2 and pids[victim] not in {r["pid"] for r in replicas}:
            break
        assert time.monotonic() < deadline, f"the killed replica was not replaced: {replicas}"
        time.sleep(1)


def test_a_flooded_task_spills_over_to_the_other_replica(servers):
    cluster, _ = servers
    before = _replica_requests(cluster).get("reverse", {})
    body = {
        "messages": [{"role": "user", "content": REVERSE}],
        "max_tokens": 190,
        "ignore_eos": True,
        "taer": {"task": "reverse"},
    }

    def one(_):
        return httpx.post(
            f"{cluster}/v1/chat/completions", json=body, headers=HEADERS, timeout=120
        ).status_code

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(one, range(16)))
    assert statuses == [200] * 16

    def spread():
        served = _replica_requests(cluster).get("reverse", {})
        added = {r: n - before.get(r, 0) for r, n in served.items()}
        return added if sum(added.values()) >= 16 else None

    added = _until(spread)
    assert added and len([r for r, n in added.items() if n > 0]) == 2, added


def test_each_replica_keeps_an_equal_share_of_the_tasks_or_what_its_slots_hold(tmp_path):
    from server.loading import ServeConfig, tasks_per_replica

    store, patterns = build_pipeline(tmp_path)  # two tasks and general; 8 experts per layer
    one_pattern = ServeConfig(store, patterns, keep=0.25)  # 2 experts per layer, 2 slots
    assert [tasks_per_replica(one_pattern, n) for n in (1, 2, 3)] == [3, 2, 1]
    four_patterns = ServeConfig(store, patterns, keep=0.25, slots_per_layer=8)
    assert [tasks_per_replica(four_patterns, n) for n in (1, 2, 3)] == [4, 4, 4]
