"""The ring of recent requests: the last ``capacity`` closed requests, newest first."""

from __future__ import annotations

import pytest

from server.engine_api import RoutingInfo
from server.recent import RecentRequests


class Run:
    """What RecentRequests reads of a closed RequestRun."""

    def __init__(self, i: int, routing: RoutingInfo | None = None) -> None:
        self.request = type("Request", (), {"request_id": f"r{i}", "arrival_time": 0.0})()
        self.routing, self.finish_reason, self.prompt_tokens, self.completion_tokens = routing, "stop", 1, i


def test_the_ring_keeps_the_last_requests_newest_first():
    recent = RecentRequests(capacity=3)
    for i in range(5):
        recent.record(Run(i))
    assert [r.request_id for r in recent.newest_first()] == ["r4", "r3", "r2"]
    assert recent.num_recorded == 5 and recent.capacity == 3
    with pytest.raises(ValueError):
        RecentRequests(capacity=0)


def test_a_record_carries_the_routing_or_none_before_routing():
    recent = RecentRequests()
    recent.record(Run(0))
    recent.record(
        Run(
            1,
            RoutingInfo(
                "math",
                "exact",
                0.8,
                0.9,
                experts_loaded=3,
                experts_reused=5,
                replica="a",
                retrieved_task="code",
                rerouted=True,
            ),
        )
    )
    routed, unrouted = recent.newest_first()
    assert (routed.task, routed.mode, routed.similarity, routed.confidence) == ("math", "exact", 0.8, 0.9)
    assert (routed.experts_loaded, routed.experts_reused, routed.replica) == (3, 5, "a")
    assert (routed.retrieved_task, routed.rerouted) == ("code", True)
    assert (unrouted.task, unrouted.mode, unrouted.experts_loaded) == (None, None, 0)
    assert routed.latency_s > 0 and routed.finished_at >= unrouted.finished_at
