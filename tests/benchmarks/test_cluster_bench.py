"""The cluster benchmark on the tiny pipeline: both one-replica configurations run on the same
seeded mixed traffic, read their counters from /metrics, and report lost requests and projections."""

from __future__ import annotations

from bench_fixtures import tiny_bench

from benchmarks.cluster import (
    LAUNCHERS,
    ClusterSettings,
    cluster_targets,
    mixed_bodies,
    project,
    render,
    run_cluster,
)
from benchmarks.policies import interleaved_prompts
from benchmarks.serving import BenchInputs


def test_mixed_traffic_is_seeded_and_draws_every_task():
    bench = tiny_bench()
    prompts = interleaved_prompts(bench.tasks, per_task=3)
    settings = ClusterSettings(requests=40, seed=3)
    first, again = mixed_bodies(prompts, settings)("m"), mixed_bodies(prompts, settings)("m")
    assert first == again and len(first) == 40
    contents = {b["messages"][-1]["content"] for b in first}
    assert {p.task for p in prompts if p.query in contents} == {p.task for p in prompts}
    other = mixed_bodies(prompts, ClusterSettings(requests=40, seed=4))("m")
    assert other != first


def test_projection_adds_the_bytes_over_the_link():
    assert project(2.0, 50e9, 100, 25.0) == {"seconds": 4.0, "tokens_per_s": 25.0}


def test_both_schedulers_serve_the_same_traffic_and_nothing_is_lost(tmp_path):
    bench = tiny_bench()
    inputs = BenchInputs(bench.store, bench.patterns, None, bench.tasks)
    prompts = interleaved_prompts(bench.tasks, per_task=2)
    settings = ClusterSettings(
        clients=3, requests=6, max_tokens=3, time_cap_s=120, configurations=("fifo", "switch-aware")
    )
    result = run_cluster(inputs, prompts, settings, tmp_path)
    fifo, aware = result["configurations"]
    assert (fifo["name"], aware["name"]) == ("fifo", "switch-aware")
    for entry in (fifo, aware):
        assert entry["requests_lost"] == 0 and entry["load"]["completion_tokens"] == 18
        assert entry["pattern_switches"] >= 1  # the first pattern activation is one
        assert entry["expert_bytes_loaded"] >= 0
        assert entry["projection"]["25GB/s"]["seconds"] >= entry["load"]["wall_s"]
    assert "--scheduler" in LAUNCHERS["switch-aware"](inputs, settings).command
    names = [t["target"] for t in result["targets"]]
    assert "switch-aware switches per 100 requests <= 0.5x fifo's" in names
    assert "fifo: no request lost" in names
    assert "projection" in render(result)


def test_a_failed_configuration_is_a_missed_target():
    checks = cluster_targets([{"name": "x", "label": "x", "error": "did not start"}])
    assert checks == [
        {"target": "x: no request lost", "measured": None, "bound": 0, "met": False, "note": "did not start"}
    ]


def test_every_configuration_has_the_same_total_expert_memory():
    bench = tiny_bench()
    inputs = BenchInputs(bench.store, bench.patterns, None, bench.tasks)
    settings = ClusterSettings(keep=0.25)

    def slots(command: list[str]) -> int:
        return int(command[command.index("--slots-per-layer") + 1])

    one = slots(LAUNCHERS["fifo"](inputs, settings).command)
    replicas = LAUNCHERS["replicas-task-affinity"](inputs, settings).command
    assert replicas[replicas.index("--replicas") + 1] == "2"
    assert (
        one == 2 * slots(replicas) == 2 * slots(LAUNCHERS["replicas-ray-default"](inputs, settings).command)
    )


def test_the_affinity_target_compares_expert_bytes_with_ray_default_routing():
    def entry(name: str, bytes_per_request: float) -> dict:
        return {
            "name": name,
            "label": name,
            "expert_bytes_per_request": bytes_per_request,
            "requests_lost": 0,
        }

    (check, *_) = cluster_targets(
        [entry("replicas-ray-default", 900.0), entry("replicas-task-affinity", 250.0)]
    )
    assert (
        check["target"].startswith("replicas-task-affinity:")
        and check["met"]
        and check["measured"] == 250 / 900
    )
    (check, *_) = cluster_targets(
        [entry("replicas-ray-default", 900.0), entry("replicas-task-affinity", 400.0)]
    )
    assert not check["met"]
