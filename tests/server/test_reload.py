"""Reloading the patterns of a running engine: under load no request is dropped and the requests in
flight answer as they would have without the reload, while new ones get the new patterns; over HTTP
a bad directory is refused with a 400 naming what is wrong, the old patterns still serving, and the
route needs the API key."""

from __future__ import annotations

import asyncio
import shutil

import httpx
import pytest
from engine_helpers import greedy_request
from pipeline import build_pipeline

from retrieval.calibrate import load_patterns_for_store
from retrieval.patterns import Pattern, PatternSet
from retrieval.refine import save_refined
from retrieval.router_check import PROFILE_FILE
from retrieval.service import RouteRequest
from server.app import create_app
from server.engine import TaerEngine
from server.loading import ServeConfig, load_engine_parts, reload_router
from server.metrics import Metrics
from server.settings import ServerSettings

pytestmark = pytest.mark.anyio
QUESTIONS = (
    "What is 5 plus 12? Add the two numbers.",
    "Reverse the letters of the word melon.",
    "What is 9 plus 16? Add the two numbers.",
    "Reverse the letters of the word stone.",
)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return build_pipeline(tmp_path_factory.mktemp("reload"))


@pytest.fixture
def config(pipeline, tmp_path) -> ServeConfig:
    """A config on a copy of the pipeline's patterns, which the test may rewrite."""
    store, patterns = pipeline
    shutil.copytree(patterns, tmp_path / "patterns")
    return ServeConfig(store, tmp_path / "patterns", keep=0.5, slots_per_layer=8)


def _engine(config: ServeConfig) -> TaerEngine:
    return TaerEngine(
        lambda: load_engine_parts(config), reload=lambda current: reload_router(config, current)
    )


def _swap_tasks(config: ServeConfig) -> str:
    """Rewrite the patterns with the two tasks' tables swapped; returns their creation time."""
    patterns = load_patterns_for_store(config.patterns_dir, config.store_dir)
    a, b = patterns.get("arithmetic"), patterns.get("reverse")
    swapped = dict(patterns.patterns) | {
        "arithmetic": Pattern("arithmetic", b.stats, b.super_experts),
        "reverse": Pattern("reverse", a.stats, a.super_experts),
    }
    created = "2099-01-01T00:00:00+00:00"
    new = PatternSet(patterns.fingerprint, swapped, patterns.always_keep, created, patterns.metadata)
    save_refined(new, config.patterns_dir)
    return created


async def _stream(engine, request, first: asyncio.Event | None = None) -> tuple[str, int]:
    text, tokens = "", 0
    async for output in engine.generate(request):
        text, tokens = text + output.text, output.completion_tokens
        if first is not None:
            first.set()
    return text, tokens


async def test_a_reload_under_load_drops_no_request_and_in_flight_ones_keep_their_routes(config):
    engine = _engine(config)
    await engine.start(Metrics().engine)
    await asyncio.to_thread(engine.wait_ready, 60)
    try:
        tokenizer = engine.tokenizer

        def requests(tag: str):
            return [greedy_request(tokenizer, f"{tag}{i}", q, 120) for i, q in enumerate(QUESTIONS)]

        alone = await asyncio.gather(*(_stream(engine, r) for r in requests("alone")))
        old = engine.describe()["patterns_created"]
        created = _swap_tasks(config)
        started = [asyncio.Event() for _ in QUESTIONS]
        streams = [
            asyncio.create_task(_stream(engine, r, first))
            for r, first in zip(requests("busy"), started, strict=True)
        ]
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started)), 60)
        result = await engine.reload_patterns()
        assert not any(stream.done() for stream in streams), "the reload should land mid-stream"
        answers = await asyncio.wait_for(asyncio.gather(*streams), 120)
        assert answers == alone and all(tokens == 120 for _, tokens in answers)
        assert (result.previous, result.created) == (old, created)
        assert engine.describe()["patterns_created"] == created
        router = engine.parts.router
        (route,) = router.route([RouteRequest("What is 1 plus 8? Add the two numbers.")])
        assert route.selection == router.selection("arithmetic")
        swapped = load_patterns_for_store(config.patterns_dir, config.store_dir)
        assert router.patterns.get("arithmetic").stats.tcess.equal(swapped.get("arithmetic").stats.tcess)
    finally:
        await engine.shutdown()


async def test_a_bad_directory_is_refused_over_http_and_the_old_patterns_serve_on(config):
    metrics = Metrics()
    app = create_app(_engine(config), ServerSettings(api_key="k3y"), metrics)
    key = {"Authorization": "Bearer k3y"}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://taer.test", timeout=60) as client:
            while (await client.get("/health")).status_code != 200:
                await asyncio.sleep(0.1)
            created = (await client.get("/v1/taer/patterns", headers=key)).json()["patterns_created"]
            assert (await client.post("/v1/taer/reload")).status_code == 401

            good = (config.patterns_dir / "patterns.json").read_text()
            (config.patterns_dir / "patterns.json").write_text('{"format_version": 1,')
            refused = await client.post("/v1/taer/reload", headers=key)
            assert refused.status_code == 400, refused.text
            error = refused.json()["error"]
            assert error["code"] == "patterns_not_reloaded" and "patterns.json" in error["message"]
            assert "the old ones still serve" in error["message"]
            (config.patterns_dir / "patterns.json").write_text(good)

            (config.patterns_dir / PROFILE_FILE).write_bytes(b"not safetensors")  # re-read on reload
            refused = await client.post("/v1/taer/reload", headers=key)
            assert refused.status_code == 400 and PROFILE_FILE in refused.json()["error"]["message"]
            assert (await client.get("/v1/taer/patterns", headers=key)).json()["patterns_created"] == created
            body = {"messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 4}
            assert (await client.post("/v1/chat/completions", json=body, headers=key)).status_code == 200

            shutil.rmtree(config.patterns_dir)
            shutil.copytree(config.store_dir.parent / "patterns", config.patterns_dir)
            new = _swap_tasks(config)
            reloaded = await client.post("/v1/taer/reload", headers=key)
            assert reloaded.status_code == 200, reloaded.text
            assert reloaded.json() | {"tasks": None} == {
                "reloaded": True,
                "created": new,
                "previous": created,
                "tasks": None,
                "router_check": reloaded.json()["router_check"],
            }
            assert (await client.get("/v1/taer/patterns", headers=key)).json()["patterns_created"] == new
            exposition = (await client.get("/metrics", headers=key)).text
            assert 'taer_pattern_reloads_total{outcome="refused"} 2.0' in exposition
            assert 'taer_pattern_reloads_total{outcome="reloaded"} 1.0' in exposition
