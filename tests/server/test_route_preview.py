"""The real engine's introspection on the tiny pipeline: a dry-run route is the route a request
takes, loads nothing and counts what a request would load; the pattern tables are the patterns'
own."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import chat_ids, started_engine
from tiny_server import tiny_pipeline

from retrieval.service import RouteRequest
from server.engine_api import GenerationRequest, SamplingParams, TaerOptions
from server.loading import ServeConfig

pytestmark = pytest.mark.anyio
QUESTION = "What is 4 plus 11? Add the two numbers."


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def engine():
    store, patterns = tiny_pipeline()
    engine = await started_engine(ServeConfig(store, patterns, keep=0.5, slots_per_layer=4))
    yield engine
    await engine.shutdown()


async def test_a_dry_run_is_the_requests_route_and_loads_nothing(engine):
    cache = engine.parts.runtime.cache
    before, resident = cache.stats.copy(), cache.resident()
    shown = await engine.preview_route(QUESTION, TaerOptions())
    assert cache.stats == before and cache.resident() == resident  # nothing loaded, nothing looked up

    router = engine.parts.router
    (route,) = router.route([RouteRequest(QUESTION)])
    assert (shown.task, shown.mode, shown.retrieval) == ("arithmetic", "pruned", "semantic")
    assert (shown.similarity, shown.confidence) == pytest.approx((route.similarity, route.confidence))
    assert shown.experts == {layer: list(ids) for layer, ids in route.selection.items()}
    missing = {layer: [e for e in ids if e not in resident[layer]] for layer, ids in shown.experts.items()}
    assert shown.experts_to_load == missing and shown.num_to_load == sum(map(len, missing.values()))
    assert shown.neighbours[0].task == "arithmetic" and "plus" in shown.neighbours[0].text
    assert shown.neighbours == tuple(sorted(shown.neighbours, key=lambda n: -n.similarity))

    # The request itself then loads exactly what the dry run said was missing.
    request = GenerationRequest(
        "q", chat_ids(engine.tokenizer, QUESTION), QUESTION, SamplingParams(max_tokens=2)
    )
    outputs = [output async for output in engine.generate(request)]
    assert outputs[0].routing.task == "arithmetic" and outputs[0].routing.experts_loaded == shown.num_to_load
    assert (await engine.preview_route(QUESTION, TaerOptions())).num_to_load == 0


async def test_a_dry_run_follows_a_forced_task_and_the_full_model(engine):
    forced = await engine.preview_route(QUESTION, TaerOptions(task="reverse"))
    assert (forced.task, forced.retrieval, forced.similarity, forced.neighbours) == (
        "reverse",
        "forced",
        None,
        (),
    )
    assert forced.experts == {k: list(v) for k, v in engine.parts.router.selection("reverse").items()}
    full = await engine.preview_route(QUESTION, TaerOptions(mode="full"))
    assert (full.task, full.mode, full.experts, full.num_to_load) == (None, "full", None, 0)


async def test_the_pattern_tables_are_the_patterns_own(engine):
    router = engine.parts.router
    tables = engine.pattern_tables()
    assert [p.task for p in tables.patterns] == router.task_names and tables.patterns[-1].task == "general"
    assert tables.layers == router.moe_layers and tables.experts_per_layer == 4 and tables.num_experts == 8
    for table in tables.patterns:
        stats = router.patterns.get(table.task).stats
        assert torch.allclose(torch.tensor(table.tcess), stats.tcess, atol=1e-5, rtol=0)
        assert table.retained == [list(router.selection(table.task)[layer]) for layer in router.moe_layers]
        assert table.num_tokens == stats.num_tokens
