"""A dry run's preview from a route and the resident experts: what is missing per layer, and in a
cluster the replica it is compared with (the one holding the pattern, else the fewest to load)."""

from __future__ import annotations

from retrieval.service import Route, RouteExplanation
from server.introspection import preview, resident_for


def test_in_a_cluster_the_preview_compares_with_the_replica_holding_the_pattern():
    route = Route("math", "pruned", {1: (0, 1, 2), 2: (3, 4, 5)})
    replicas = [
        {
            "replica": "a",
            "ready": True,
            "resident_experts": {"1": [0, 1, 2], "2": [3, 4, 5]},
            "resident_patterns": [],
        },
        {
            "replica": "b",
            "ready": True,
            "resident_experts": {"1": [0], "2": [3]},
            "resident_patterns": ["math"],
        },
        {"replica": "c", "ready": False, "resident_experts": {}, "resident_patterns": ["math"]},
    ]
    resident, replica = resident_for({"replicas": replicas}, route)
    assert replica == "b" and resident == {1: {0}, 2: {3}}
    shown = preview(RouteExplanation(route), [], resident, replica)
    assert shown.num_to_load == 4 and shown.experts_to_load == {1: [1, 2], 2: [4, 5]}
    # Without a holder, the replica with the fewest to load.
    replicas[1]["resident_patterns"] = []
    assert resident_for({"replicas": replicas}, route)[1] == "a"
    assert resident_for({"replicas": []}, route) == ({}, None)
