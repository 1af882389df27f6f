"""A short soak of a real `taer serve` of the tiny model: 12 concurrent clients, 240 greedy requests
over every generation route, streamed and not, mixing both tasks, with streams cut by their clients
and requests given up at a deadline. Every completed answer equals the same request's answer alone,
nothing is lost or duplicated, the gauges are back to zero and memory stays flat. `taer bench soak`
runs the long version (32 clients, 2,000 requests)."""

from __future__ import annotations

import pytest
from tiny_server import tasks_file, tiny_serve_spec

from benchmarks.servers import ServerProcess
from benchmarks.soak import (
    GAUGES,
    ROUTES,
    Outcome,
    SoakRequest,
    SoakSettings,
    plan,
    soak,
    stream_outcome,
    task_prompts,
)

SETTINGS = SoakSettings(clients=12, requests=240, warmup_requests=120, seed=1)


@pytest.mark.slow
def test_a_short_soak_answers_as_alone_and_loses_nothing(tmp_path):
    with ServerProcess(tiny_serve_spec("soak"), tmp_path / "taer.log") as server:
        report = soak(server, task_prompts(tasks_file(), per_task=6), SETTINGS)
    outcomes = report["outcomes"]
    assert report["sent"] == 240 and sum(outcomes.values()) == 240
    assert outcomes.get("failed", 0) == 0, report["failed_examples"]
    assert outcomes["completed"] >= 150 and outcomes["cut"] >= 1  # the run did what it says
    assert report["mismatches"] == 0, report["mismatch_examples"]
    assert report["lost"] == 0 and report["duplicated"] == 0, report["server_counted_per_path"]
    assert report["gauges_at_end"] == dict.fromkeys(GAUGES, 0.0)
    assert report["rss_growth"] <= 0.05, report["rss_bytes"]
    rss = report["rss_bytes"]  # resident memory split: the process's own, and the mapped store pages
    assert 0 < rss["anon_after_warmup"] < rss["after_warmup"] and rss["file_after_warmup"] > 0
    assert report["rss_anon_growth"] == rss["anon_after_run"] / rss["anon_after_warmup"] - 1
    assert report["ok"]


def test_the_plan_is_seeded_and_covers_every_route_and_prompt():
    prompts = ["a", "b", "c"]
    first, again = plan(prompts, SETTINGS), plan(prompts, SETTINGS)
    assert first == again and len(first) == 240
    assert {r.route for r in first} == set(ROUTES) and {r.prompt for r in first} == set(prompts)
    with_deadline = [r for r in first if r.deadline_s is not None]
    assert 0 < len(with_deadline) < 60


def test_a_stream_counts_as_completed_only_when_it_ends_as_its_api_says():
    chat = SoakRequest(0, "chat-stream", "p")
    chunk = '{"id": "c1", "choices": [{"delta": {"content": "ab"}}]}'
    assert stream_outcome(chat, [chunk, "[DONE]"]) == Outcome(chat, "completed", "ab", "c1")
    assert stream_outcome(chat, [chunk]).kind == "failed"  # cut short by the server
    assert stream_outcome(chat, [chunk, "[DONE]", "[DONE]"]).kind == "failed"
    other = '{"id": "c2", "choices": [{"delta": {"content": "c"}}]}'
    assert stream_outcome(chat, [chunk, other, "[DONE]"]).kind == "failed"
    tgi = SoakRequest(1, "generate_stream", "p")
    token = '{"token": {"text": "a"}, "generated_text": null}'
    final = '{"token": {"text": "b"}, "generated_text": "ab"}'
    assert stream_outcome(tgi, [token, final]) == Outcome(tgi, "completed", "ab")
    assert stream_outcome(tgi, [token]).kind == "failed"
