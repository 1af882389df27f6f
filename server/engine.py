"""The engine the HTTP layer talks to: an asyncio facade over the engine thread.

``generate`` hands a request to the thread and awaits its outputs, which the thread passes back with
``loop.call_soon_threadsafe``: the event loop never waits on torch, FAISS or the encoder. Loading
also happens on the engine thread, so the server answers 503 (and ``/health`` says loading) until
the model is ready.

``reload_patterns`` loads the patterns directory again off both the event loop and the engine
thread (reading and checking it takes seconds), then swaps the router on the engine thread between
two steps: the requests in flight keep the routes they have, and a directory that fails a check is
refused with the old patterns still serving. ``record`` turns on `taer serve --record`
(``server/recording.py``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from expert_store.errors import TaerError
from retrieval.service import PatternRouter, Route
from server.detokenizer import IncrementalDetokenizer
from server.engine_api import EngineNotReadyError, GenerationOutput, GenerationRequest, ModelFacts
from server.engine_core import EngineCore, EngineParts
from server.introspection import PatternIntrospection
from server.record_files import RecordOptions
from server.recording import EngineRecording
from server.reload import PatternsReloaded
from server.scheduler import Sequence

logger = logging.getLogger(__name__)

RELOAD_TIMEOUT_S = 120.0  # the most a reload waits for the engine thread to finish its step


class TaerEngine(ModelFacts, PatternIntrospection):
    """Implements ``server.engine_api.Engine`` over ``EngineCore``. ``reload``: the current router ->
    a new one from the patterns directory as it is now (``None``: this engine cannot reload);
    ``record``: record every request's routing."""

    def __init__(
        self,
        load: Callable[[], EngineParts],
        max_batch_size: int = 16,
        scheduler: str = "fifo",
        *,
        reload: Callable[[PatternRouter], PatternRouter] | None = None,
        record: RecordOptions | None = None,
    ) -> None:
        self._load = load
        self._max_batch_size = max_batch_size
        self._scheduler = scheduler
        self._reload = reload
        self._record = record
        self._reload_lock = asyncio.Lock()
        self._core: EngineCore | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._metrics = None

    # Lifecycle ----------------------------------------------------------------------------------

    async def start(self, metrics) -> None:
        self._thread = threading.Thread(target=self._main, args=(metrics,), name="taer-engine", daemon=True)
        self._thread.start()

    def _main(self, metrics) -> None:
        self._metrics = metrics
        recording = None
        try:
            parts = self._load()
            if self._record is not None:
                recording = EngineRecording(parts, self._record, metrics)
                recording.start()
                logger.info("recording every request's routing to %s", self._record.directory)
            self._core = EngineCore(parts, metrics, self._max_batch_size, self._scheduler, recording)
            self._ready.set()
            logger.info("engine ready: %s", parts.model_name)
            self._core.run_forever()
        except BaseException as error:
            logger.exception("engine thread stopped")
            self._error = error
        finally:
            if recording is not None:
                recording.close()

    async def shutdown(self) -> None:
        if self._core is not None:
            self._core.stop()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    # The contract -------------------------------------------------------------------------------

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set() and self._error is None

    @property
    def parts(self) -> EngineParts:
        if self._core is None:
            raise EngineNotReadyError("the model is still loading")
        return self._core.parts

    async def generate(
        self, request: GenerationRequest, route: Route | None = None
    ) -> AsyncIterator[GenerationOutput]:
        """``route``: the request's route when the caller already retrieved it (a cluster's ingress);
        ``None`` routes it here."""
        if not self.is_ready:
            raise EngineNotReadyError("the model is still loading")
        sampling = request.sampling
        if sampling.constraint is not None:  # compiled here, off the engine thread (and cached)
            await asyncio.to_thread(self._core.check_constraint, sampling.constraint)
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        group = [
            Sequence(
                request=request,
                emit=lambda item: loop.call_soon_threadsafe(outputs.put_nowait, item),
                detokenizer=IncrementalDetokenizer(self.tokenizer, sampling.stop),
                route=route,
                index=index,
            )
            for index in range(sampling.n)
        ]
        self._core.submit(group)
        unfinished = sampling.n
        try:
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):  # the finally aborts its other samples
                    raise item
                yield item
                if item.finished:
                    unfinished -= 1
                    if unfinished == 0:
                        return
        finally:
            if unfinished:
                self._core.abort(request.request_id)

    async def abort(self, request_id: str) -> None:
        if self._core is not None:
            self._core.abort(request_id)

    async def reload_patterns(self) -> PatternsReloaded:
        """Load the patterns directory again and serve with it from the next step (see the module
        docstring); a :class:`TaerError` naming the fault leaves the old patterns serving. One
        reload at a time."""
        if self._reload is None:
            raise TaerError("this engine was built without a patterns directory to reload")
        core = self._core
        if core is None or not self.is_ready:
            raise EngineNotReadyError("the model is still loading; reload once it is ready")
        async with self._reload_lock:
            old = core.parts.router
            try:
                router = await asyncio.to_thread(self._reload, old)
                await self._on_engine_thread(core, lambda: setattr(core.parts, "router", router))
            except Exception as error:
                self._count_reload("refused")
                if isinstance(error, TaerError):
                    raise
                logger.exception("reloading the patterns failed")
                raise TaerError(f"the patterns could not be loaded ({error!r})") from error
        self._count_reload("reloaded")
        result = PatternsReloaded(
            created=router.patterns.created,
            previous=old.patterns.created,
            tasks=router.task_names,
            router_check=router.check is not None,
        )
        logger.info("patterns reloaded: created %s (were %s)", result.created, result.previous)
        return result

    async def _on_engine_thread(self, core: EngineCore, function: Callable[[], None]) -> None:
        """Run ``function`` on the engine thread between two steps and wait until it has run."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def call() -> None:
            if not done.cancelled():
                function()
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

        core.call_soon(call)
        try:
            await asyncio.wait_for(done, RELOAD_TIMEOUT_S)
        except asyncio.TimeoutError:  # not the builtin before Python 3.11
            raise TaerError(
                f"the engine thread did not take the new patterns within {RELOAD_TIMEOUT_S:.0f} s; "
                "the old ones still serve"
            ) from None

    def _count_reload(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.record_pattern_reload(outcome)

    async def check_health(self) -> None:
        if self._error is not None:
            raise TaerError(f"the engine stopped: {self._error}")
        if self._thread is not None and not self._thread.is_alive() and self._ready.is_set():
            raise TaerError("the engine thread is not running")

    def task_names(self) -> list[str]:
        return self.parts.router.task_names

    def describe(self) -> dict[str, Any]:
        parts = self.parts
        cache = parts.runtime.cache
        stats = cache.stats
        return {
            "model": parts.model_name,
            "patterns_created": parts.router.patterns.created,
            "tasks": parts.router.task_names,
            "mode": parts.router.default_mode,
            "budget": parts.router.budget.describe(),
            "slots_per_layer": cache.num_slots,
            "num_experts": parts.runtime.layout.num_experts,
            "resident_experts": {str(layer): experts for layer, experts in cache.resident().items()},
            "expert_dtype": parts.runtime.expert_dtype,
            "resident_expert_bytes": cache.resident_bytes,
            "expert_capacity_bytes": cache.capacity_bytes,
            "cache": {
                "loads": stats.loads,
                "hits": stats.hits,
                "misses": stats.misses,
                "evictions": stats.evictions,
                "bytes_loaded": stats.bytes_loaded,
                "hit_rate": stats.hit_rate,
                "activations": stats.activations,
            },
            "retrieval": "semantic" if parts.router.index is not None else "none (general pattern)",
        }
