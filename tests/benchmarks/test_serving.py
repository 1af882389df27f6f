"""The serving benchmark: the load generator against a real `taer serve` on the tiny pipeline, its
bounds, and what is sent to the peer. The peer server itself is not started here (it is slow to
start); `taer bench all` runs it."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from bench_fixtures import tiny_bench

from benchmarks.loadgen import Workload, check_loopback, run_load
from benchmarks.policies import BenchPrompt, interleaved_prompts
from benchmarks.servers import ServerProcess, free_port, peer_spec, taer_spec
from benchmarks.serving import (
    BenchInputs,
    ServingSettings,
    peer_bodies,
    render_servers,
    run_server_comparison,
    server_targets,
    taer_bodies,
)


@pytest.fixture(scope="module")
def bench():
    return tiny_bench()


@pytest.fixture(scope="module")
def server(bench, tmp_path_factory):
    spec = taer_spec(bench.store, bench.patterns, keep=0.5, port=free_port())
    with ServerProcess(spec, tmp_path_factory.mktemp("logs") / "taer.log") as process:
        yield process


def test_only_loopback_is_a_target():
    check_loopback("http://127.0.0.1:8000")
    for url in ("http://localhost:8000", "http://10.0.0.1:8000", "https://example.com"):
        with pytest.raises(ValueError, match="only targets 127.0.0.1"):
            check_loopback(url)
    with pytest.raises(ValueError):
        asyncio.run(run_load("http://0.0.0.0:1", Workload([{}], "/x", 1, 1)))
    with pytest.raises(ValueError, match="clients >= 1"):
        Workload([{}], "/x", clients=0, requests=1)


def test_streaming_load_counts_tokens_and_times(bench, server):
    prompts = interleaved_prompts(bench.tasks, per_task=2)
    bodies = taer_bodies(prompts, max_tokens=5)(server.model_id())
    result = asyncio.run(run_load(server.spec.base_url, Workload(bodies, "/v1/chat/completions", 2, 5)))
    assert (result.sent, result.completed, result.failed, result.cut) == (5, 5, 0, 0)
    assert all(r.completion_tokens == 5 for r in result.records)  # ignore_eos: exactly max_tokens
    assert result.completion_tokens == 25
    assert all(0 < r.ttft_s <= r.latency_s for r in result.records)
    summary = result.summary()
    assert summary["throughput_tokens_per_s"] == pytest.approx(25 / result.wall_s)
    assert summary["ttft_ms_p50"] <= summary["latency_ms_p99"]
    memory = server.memory()
    assert 0 < memory["rss_bytes"] <= memory["peak_rss_bytes"]


def test_time_cap_cuts_requests_in_flight(bench, server):
    body = taer_bodies([BenchPrompt("reverse", (("user", "Reverse the word tiger."),), None)], 180)
    workload = Workload(body(server.model_id()), "/v1/chat/completions", 2, 50, time_cap_s=0.4)
    start = time.perf_counter()
    result = asyncio.run(run_load(server.spec.base_url, workload))
    assert time.perf_counter() - start < 5
    assert result.cut == 2 and result.sent < 50
    assert result.completed + result.failed + result.cut == result.sent


def test_errors_are_recorded_not_raised(server):
    bodies = [{"messages": [], "max_tokens": 3}]  # the server rejects an empty conversation
    result = asyncio.run(run_load(server.spec.base_url, Workload(bodies, "/v1/chat/completions", 1, 2)))
    assert result.failed == 2 and result.completed == 0
    assert result.summary()["errors"][0].startswith("HTTP 400")


def test_peer_gets_the_same_prompt_and_a_fixed_length(bench, server):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bench.checkpoint)
    prompt = BenchPrompt("reverse", (("user", "Reverse the word tiger."),), None)
    body = peer_bodies([prompt], 7, tokenizer)("ckpt")[0]
    assert body["prompt"] == tokenizer.apply_chat_template(
        prompt.chat(), add_generation_prompt=True, tokenize=False
    )
    assert json.loads(body["generation_config"])["eos_token_id"] == -1 and body["max_tokens"] == 7
    spec = peer_spec(bench.checkpoint, 1234, continuous_batching=True)
    assert spec.command[1:3] == ["serve", str(bench.checkpoint)]
    assert (
        "--continuous-batching" in spec.command
        and spec.command[spec.command.index("--host") + 1] == "127.0.0.1"
    )
    assert spec.env["HF_HUB_OFFLINE"] == "1"


def test_server_target_is_the_throughput_ratio_at_most_clients():
    def server(name, *throughputs):
        return {"name": name, "label": name, "levels": [{"throughput_tokens_per_s": t} for t in throughputs]}

    result = {
        "settings": {"clients": [1, 8]},
        "servers": [server("taer", 10, 90), server("peer", 10, 40), server("peer-cb", 10, 50)],
    }
    checks = server_targets(result)
    assert [(c["measured"], c["met"]) for c in checks] == [(2.25, True), (1.8, False)]


def test_servers_up_together_each_measured_and_a_missing_peer_reported(bench, tmp_path):
    inputs = BenchInputs(bench.store, bench.patterns, None, bench.tasks)  # no checkpoint: no peer
    prompts = interleaved_prompts(bench.tasks, per_task=1)
    settings = ServingSettings(clients=(1, 2), rounds=1, min_requests=2, max_tokens=3, peers=("default",))
    result = run_server_comparison(inputs, prompts, settings, tmp_path)
    taer, taer_all, peer = result["servers"]
    assert (taer["name"], taer_all["name"]) == ("taer", "taer-all")
    assert taer_all["label"] == "taer serve (every expert resident)"
    assert result["settings"]["interleaved"] is True
    for server in (taer, taer_all):
        assert [level["clients"] for level in server["levels"]] == [1, 2]
        assert all(level["completed"] == 2 and level["completion_tokens"] == 6 for level in server["levels"])
        assert server["peak_rss_bytes"] >= server["idle_rss_bytes"] > 0
    assert (tmp_path / "taer.log").exists() and (tmp_path / "taer-all.log").exists()
    assert not any("taer-all" in t["target"] or "every expert" in t["target"] for t in result["targets"])
    assert peer["error"] == "no plain checkpoint given"
    peer_targets = [t for t in result["targets"] if peer["label"] in t["target"]]
    assert peer_targets == [
        {
            "target": f"taer >= 2x {peer['label']} throughput at 2 clients",
            "measured": None,
            "bound": 2.0,
            "met": False,
            "note": "no plain checkpoint given",
        }
    ]
    assert "failed: no plain checkpoint given" in render_servers(result)
