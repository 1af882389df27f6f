"""Stopping gracefully: on the first SIGTERM or SIGINT the server refuses new requests (503 with
``Retry-After``), lets the requests in flight finish for up to a grace period, then exits 0; a
second signal exits at once.

Uvicorn's own handling stops listening straight away and re-raises the signal after shutting down
(so the process ends "killed by SIGTERM", not 0); :class:`GracefulServer` replaces it.

SIGHUP (whose default would end the process) reloads the patterns instead (``server/reload.py``):
the handler only notes it, and the server's next tick starts the reload on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType

import uvicorn
from fastapi import FastAPI

from server.reload import reload_on_signal

logger = logging.getLogger(__name__)

FORCED_EXIT_STATUS = 1
_BACKSTOP_S = 2.0  # after the grace period, how long uvicorn waits before cancelling what is left


class Drain:
    """Whether the server is stopping, and until when in-flight requests may run."""

    def __init__(self) -> None:
        self.deadline: float | None = None

    @property
    def is_draining(self) -> bool:
        return self.deadline is not None

    def start(self, grace_s: float) -> None:
        if self.deadline is None:
            self.deadline = time.monotonic() + grace_s

    def is_over(self, num_in_flight: int) -> bool:
        return self.deadline is not None and (num_in_flight == 0 or time.monotonic() >= self.deadline)


class GracefulServer(uvicorn.Server):
    """A uvicorn server that drains before it stops (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, grace_s: float) -> None:
        super().__init__(config)
        self._app = app
        self._grace_s = grace_s
        self._reload_asked = False
        self._reloads: set[asyncio.Task] = set()  # a reference each, so that none is collected mid-run

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            if threading.current_thread() is not threading.main_thread():  # as uvicorn's own
                yield
                return
            previous = signal.signal(signal.SIGHUP, self._ask_reload)
            try:
                yield
            finally:
                signal.signal(signal.SIGHUP, previous)

    def _ask_reload(self, sig: int, frame: FrameType | None) -> None:
        self._reload_asked = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        drain: Drain = self._app.state.drain
        if drain.is_draining:
            logger.warning("second stop signal: exiting now, abandoning the requests in flight")
            logging.shutdown()
            os._exit(FORCED_EXIT_STATUS)
        logger.info(
            "stop signal: refusing new requests, finishing those in flight (up to %.0f s)", self._grace_s
        )
        drain.start(self._grace_s)

    async def on_tick(self, counter: int) -> bool:
        if self._reload_asked:
            self._reload_asked = False
            task = asyncio.create_task(reload_on_signal(self._app))
            self._reloads.add(task)
            task.add_done_callback(self._reloads.discard)
        if await super().on_tick(counter):
            return True
        drain: Drain = self._app.state.drain
        if drain.is_over(self._app.state.admission.num_in_flight):
            if self._app.state.admission.num_in_flight:
                logger.warning("grace period over; ending the requests still in flight")
            self.should_exit = True
        return self.should_exit


def serve(app: FastAPI, host: str, port: int, grace_s: float) -> int:
    """Serves ``app`` until a stop signal; 0 after a graceful stop."""
    config = uvicorn.Config(
        app, host=host, port=port, log_level="info", timeout_graceful_shutdown=_BACKSTOP_S
    )
    GracefulServer(config, app, grace_s).run()
    return 0
