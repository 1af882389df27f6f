"""The retrieval thread: embeds requests and chooses their patterns beside the engine thread.

Retrieval runs here, not on the engine thread, so that it overlaps with decoding instead of stalling
every running sequence: a request reaches the engine thread with its route.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from expert_store.errors import TaerError
from retrieval.service import RouteRequest
from server.scheduler import Sequence

if TYPE_CHECKING:
    from server.engine_core import EngineParts

logger = logging.getLogger(__name__)


class RetrievalThread:
    """The retrieval thread: routes submitted requests (embeds them, chooses their patterns), as
    many together as have arrived, so that retrieval overlaps with decoding instead of stalling
    every running sequence. A request is a group of sequences (its samples) sharing one route. Each
    routed group goes to ``deliver``; a request that cannot be routed goes to ``fail`` (each
    sequence) and then to ``deliver`` without a route (so it is counted as arrived)."""

    def __init__(
        self,
        parts: EngineParts,
        metrics,
        deliver: Callable[[list[Sequence]], None],
        fail: Callable[[Sequence, BaseException], None],
    ) -> None:
        self._parts = parts  # its router is read per batch: a test may swap it
        self._metrics = metrics
        self._deliver = deliver
        self._fail = fail
        self._pending: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="taer-retrieval", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, group: list[Sequence]) -> None:
        """Route one request's samples (they share one route)."""
        self._pending.put(group)

    def stop(self) -> None:
        """Route what was submitted before, then end the thread."""
        self._pending.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            pending = [self._pending.get()]
            while True:
                try:
                    pending.append(self._pending.get_nowait())
                except queue.Empty:
                    break
            stop = None in pending
            pending = [s for s in pending if s is not None]
            if pending:
                self._route(pending)
            if stop:
                return

    def _route(self, pending: list[list[Sequence]]) -> None:
        requests = [
            RouteRequest(g[0].request.retrieval_text, g[0].request.taer.task, g[0].request.taer.mode)
            for g in pending
        ]
        try:
            routes = self._parts.router.route(requests)
        except Exception as error:  # a request's own fault (TaerError) or a retrieval fault: fail them
            if not isinstance(error, TaerError):
                logger.exception("retrieval failed")
            for group in pending:
                for sequence in group:
                    self._fail(sequence, error)
                self._deliver(group)  # with no route: only counted as arrived
            return
        for group, route in zip(pending, routes, strict=True):
            for sequence in group:
                sequence.route = route
            if route.retrieval_seconds:
                self._metrics.observe_retrieval(route.retrieval_seconds)
            self._deliver(group)
