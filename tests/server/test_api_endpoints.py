"""GET /v1/models, /health, /metrics, /v1/taer/patterns, and the app's lifespan."""

from __future__ import annotations

import time

import pytest
from api_helpers import app_client, chat_body
from fake_engine import FakeEngine
from openai.types import Model
from prometheus_client.parser import text_string_to_metric_families

from server.app import create_app
from server.settings import ServerSettings

pytestmark = pytest.mark.anyio


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_models(client):
    response = await client.get("/v1/models")
    body = response.json()
    assert body["object"] == "list"
    [card] = body["data"]
    model = Model.model_validate(card)
    assert (model.id, model.object, model.owned_by) == ("fake-moe", "model", "taer")
    assert abs(model.created - time.time()) < 60  # wall clock
    assert card["max_model_len"] == 256


async def test_health(client):
    response = await client.get("/health")
    assert (response.status_code, response.json()) == (200, {"status": "ready"})


async def test_patterns_is_the_engines_description(client, engine):
    await client.post("/v1/chat/completions", json=chat_body("sort this"))
    response = await client.get("/v1/taer/patterns")
    assert response.status_code == 200
    assert response.json() == engine.describe()
    described = response.json()
    assert described["tasks"] == engine.task_names()
    assert described["cache"]["misses"] == engine.config.experts_per_pattern  # "sort" loaded once


async def test_metrics(client):
    chat = (await client.post("/v1/chat/completions", json=chat_body("sort this"))).json()
    await client.post("/v1/chat/completions", json={"messages": []})
    await client.post("/generate", json={"inputs": "hello"})
    await client.get("/no/such/route/123")
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = _samples(response.text)

    def value(name: str, **labels: str) -> float:
        return samples[(name, frozenset(labels.items()))]

    assert value("taer_http_requests_total", endpoint="/v1/chat/completions", status="200") == 1
    assert value("taer_http_requests_total", endpoint="/v1/chat/completions", status="400") == 1
    assert value("taer_http_requests_total", endpoint="/generate", status="200") == 1
    assert value("taer_http_requests_total", endpoint="other", status="404") == 1  # no label per unknown path
    assert value("taer_prompt_tokens_total") == chat["usage"]["prompt_tokens"] + len("hello") + 1
    assert value("taer_generation_tokens_total") == chat["usage"]["completion_tokens"] + len("hello") + 1
    assert value("taer_time_to_first_token_seconds_count") == 2
    assert value("taer_e2e_request_latency_seconds_count") == 2
    assert value("taer_inter_token_latency_seconds_count") == (chat["usage"]["completion_tokens"] - 1) + len(
        "hello"
    )
    assert value("taer_generation_requests_in_flight") == 0
    assert value("taer_routed_requests_total", task="sort", mode="pruned") == 1
    assert value("taer_routed_requests_total", task="general", mode="pruned") == 1
    # Reported by the (fake) engine through EngineMetrics.
    assert value("taer_expert_loads_total") == 16
    assert value("taer_expert_load_bytes_total") == 16 * 1024
    assert value("taer_expert_misses_total") == 16
    assert value("taer_pattern_switches_total", task="sort") == 1
    assert value("taer_pattern_switches_total", task="general") == 1
    assert value("taer_resident_expert_bytes") == 16 * 1024
    assert value("taer_retrieval_latency_seconds_count") == 2
    assert value("taer_queue_length") == 0
    assert value("taer_requests_running") == 0


async def test_each_app_has_its_own_registry():
    async with app_client(FakeEngine()) as first, app_client(FakeEngine()) as second:
        await first.post("/v1/chat/completions", json=chat_body())
        first_samples = _samples((await first.get("/metrics")).text)
        second_samples = _samples((await second.get("/metrics")).text)
    key = ("taer_prompt_tokens_total", frozenset())
    assert first_samples[key] > 0
    assert second_samples[key] == 0


async def test_lifespan_starts_and_stops_the_engine():
    engine = FakeEngine()
    app = create_app(engine, ServerSettings())
    assert not engine.started
    async with app.router.lifespan_context(app):
        assert engine.started
        assert engine.metrics is not None
        assert not engine.stopped
    assert engine.stopped
