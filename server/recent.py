"""The last requests the HTTP layer served, for ``GET /v1/taer/requests`` and the web page.

A bounded ring: each :class:`~server.request_run.RequestRun` adds one :class:`RequestRecord` when
it closes (finished, failed, timed out or abandoned by its client), and the oldest fall out. Kept
per app on ``app.state``, never global; only the event loop touches it.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.request_run import RequestRun

DEFAULT_CAPACITY = 200


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One closed request. ``finished_at``: Unix time; ``latency_s``: from arrival to close.
    ``finish_reason`` is ``None`` for a request that did not finish (an error, its deadline or its
    client's disconnect). The routing fields are ``None`` (and 0) when it ended before routing;
    ``retrieved_task`` and ``rerouted`` are the router check's (``None`` where it did not run)."""

    request_id: str
    finished_at: float
    latency_s: float
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    task: str | None
    mode: str | None
    similarity: float | None
    confidence: float | None
    experts_loaded: int
    experts_reused: int
    replica: str | None
    retrieved_task: str | None = None
    rerouted: bool | None = None


class RecentRequests:
    """The last ``capacity`` closed requests, newest first when listed."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self._records: deque[RequestRecord] = deque(maxlen=capacity)
        self.num_recorded = 0

    def record(self, run: RequestRun) -> None:
        """Add ``run``, which has just closed."""
        routing = run.routing
        self._records.append(
            RequestRecord(
                request_id=run.request.request_id,
                finished_at=time.time(),
                latency_s=time.monotonic() - run.request.arrival_time,
                finish_reason=run.finish_reason,
                prompt_tokens=run.prompt_tokens,
                completion_tokens=run.completion_tokens,
                task=routing.task if routing else None,
                mode=routing.mode if routing else None,
                similarity=routing.similarity if routing else None,
                confidence=routing.confidence if routing else None,
                experts_loaded=routing.experts_loaded if routing else 0,
                experts_reused=routing.experts_reused if routing else 0,
                replica=routing.replica if routing else None,
                retrieved_task=routing.retrieved_task if routing else None,
                rerouted=routing.rerouted if routing else None,
            )
        )
        self.num_recorded += 1

    @property
    def capacity(self) -> int:
        return self._records.maxlen or 0

    def newest_first(self) -> list[RequestRecord]:
        return list(reversed(self._records))
