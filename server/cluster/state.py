"""Where replicas report what the ingress shows: one named Ray actor per application.

Ray Serve routes a handle call to *some* replica; ``/metrics`` and ``/v1/taer/patterns`` need
*every* replica's figures. Each replica therefore reports a :class:`ReplicaReport` every
``REPORT_PERIOD_S`` to this actor, and the ingress reads the fresh ones. A replica that died stops
reporting and ages out; its restarted successor reports under its own id.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import ray

NAMESPACE = "taer"
REPORT_PERIOD_S = 1.0
STALE_AFTER_S = 10.0


@dataclass(slots=True)
class ReplicaReport:
    """One replica's state, as it last reported it."""

    replica: str  # Ray Serve's replica id
    pid: int
    ready: bool
    metrics_text: str  # the replica's engine metrics, Prometheus text
    describe: dict[str, Any]  # the engine's describe(), plus what the replica adds
    reported_at: float = field(default_factory=time.time)


@ray.remote(num_cpus=0)
class ClusterState:
    def __init__(self) -> None:
        self._reports: dict[str, ReplicaReport] = {}

    def report(self, report: ReplicaReport) -> None:
        self._reports[report.replica] = report

    def forget(self, replica: str) -> None:
        self._reports.pop(replica, None)

    def fresh_reports(self, max_age_s: float = STALE_AFTER_S) -> list[ReplicaReport]:
        now = time.time()
        for replica in [r for r, report in self._reports.items() if now - report.reported_at > max_age_s]:
            del self._reports[replica]
        return sorted(self._reports.values(), key=lambda report: report.replica)


def cluster_state(app_name: str):
    """The application's state actor, created by whichever deployment asks first. Detached, so it
    outlives the replica that created it; ``taer serve --replicas`` removes it when it stops."""
    return ClusterState.options(
        name=state_actor_name(app_name), namespace=NAMESPACE, get_if_exists=True, lifetime="detached"
    ).remote()


def state_actor_name(app_name: str) -> str:
    return f"taer-cluster-state-{app_name}"
