"""Retrieval runs beside the engine thread: a slow route never stalls running sequences, a request
aborted while it is being routed never runs, and a routing error fails only its requests."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time

import pytest
from engine_helpers import greedy_request, started_engine
from pipeline import build_pipeline

from expert_store.errors import TaerError
from server.loading import ServeConfig

LONG, SLOW, BAD = "Reverse the letters of the word zebra.", "What is 3 plus 10?", "What is 21 plus 28?"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return build_pipeline(tmp_path_factory.mktemp("retrieval-thread"))


class GatedRouter:
    """Wraps the engine's router: requests for SLOW wait for ``gate``; BAD raises."""

    def __init__(self, router) -> None:
        self.router = router
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def route(self, requests):
        texts = [r.text for r in requests]
        if BAD in texts:
            raise TaerError("no pattern for this request")
        if SLOW in texts:
            self.waiting.set()
            self.gate.wait(10)
        return self.router.route(requests)

    def __getattr__(self, name):
        return getattr(self.router, name)


@pytest.mark.anyio
async def test_slow_retrieval_does_not_stall_decoding_and_aborts_and_errors_stay_local(pipeline):
    store, patterns = pipeline
    engine = await started_engine(ServeConfig(store, patterns, keep=0.5, slots_per_layer=8), max_batch_size=4)
    router = GatedRouter(engine.parts.router)
    engine.parts.router = router
    tokenizer = engine.tokenizer
    try:
        # 1. While SLOW waits in retrieval for 1 s, LONG keeps decoding at its usual pace.
        long_stream = engine.generate(greedy_request(tokenizer, "long", LONG, 60))
        await long_stream.__anext__()
        slow_task = asyncio.create_task(_tokens(engine.generate(greedy_request(tokenizer, "slow", SLOW, 4))))
        await asyncio.to_thread(router.waiting.wait, 10)
        arrivals = []
        released = asyncio.get_running_loop().call_later(1.0, router.gate.set)
        async for output in long_stream:
            arrivals.append(time.perf_counter())
            if output.finished:
                break
        released.cancel()
        router.gate.set()
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        assert max(gaps) < 0.5  # routing on the engine thread would stall one gap for 1 s
        assert len(await slow_task) == 4

        # 2. Aborted while being routed: it never reaches the model.
        router.gate.clear()
        router.waiting.clear()
        stream = engine.generate(greedy_request(tokenizer, "gone", SLOW, 4))
        first = asyncio.create_task(stream.__anext__())
        await asyncio.to_thread(router.waiting.wait, 10)
        await engine.abort("gone")
        router.gate.set()
        output = await first
        assert output.finished and output.finish_reason == "abort" and output.token_ids == []

        # 3. A routing error fails its own request; the next one is served.
        with pytest.raises(TaerError, match="no pattern for this request"):
            await _tokens(engine.generate(greedy_request(tokenizer, "bad", BAD, 4)))
        assert len(await _tokens(engine.generate(greedy_request(tokenizer, "after", LONG, 3)))) == 3
    finally:
        router.gate.set()
        await engine.shutdown()


async def _tokens(stream) -> list[int]:
    return [t async for output in stream for t in output.token_ids]
