"""POST /v1/taer/route (the dry run), GET /v1/taer/tcess, GET /v1/taer/requests and the web page's
files, over the fake engine: answers, validation in the OpenAI error shape, the API key."""

from __future__ import annotations

import json

import pytest
from api_helpers import app_client, assert_openai_error, chat_body
from fake_engine import FakeEngine

from server.settings import ServerSettings

pytestmark = pytest.mark.anyio
ROUTES = ("/v1/taer/route", "/v1/taer/tcess", "/v1/taer/requests")


async def test_a_dry_run_routes_like_a_request_and_neither_generates_nor_loads(client, engine):
    before = engine.describe()
    response = await client.post("/v1/taer/route", json={"prompt": "please reverse this"})
    assert response.status_code == 200, response.text
    preview = response.json()
    assert preview["task"] == "reverse" and preview["mode"] == "pruned" and preview["retrieval"] == "semantic"
    assert preview["similarity"] == 0.9 and preview["neighbours"][0]["task"] == "reverse"
    assert preview["num_to_load"] == preview["num_experts"] == 16 and set(preview["experts"]) == {"0", "1"}
    assert engine.requests == [] and engine.describe() == before  # nothing generated, nothing resident

    # The route a chat request then takes is the one previewed; now its experts are resident.
    chat = await client.post("/v1/chat/completions", json=chat_body("please reverse this"))
    assert chat.json()["taer"]["task"] == "reverse"
    again = (await client.post("/v1/taer/route", json=chat_body("please reverse this"))).json()
    assert again["task"] == "reverse" and again["num_to_load"] == 0


@pytest.mark.parametrize(
    ("taer", "task", "retrieval", "has_experts"),
    [
        ({"task": "sort"}, "sort", "forced", True),
        ({"mode": "full"}, None, "full", False),
        ({"mode": "exact"}, "arithmetic", "semantic", True),
    ],
)
async def test_a_dry_run_follows_the_taer_options(client, taer, task, retrieval, has_experts):
    response = await client.post("/v1/taer/route", json={"prompt": "arithmetic please", "taer": taer})
    preview = response.json()
    assert (preview["task"], preview["retrieval"]) == (task, retrieval)
    assert preview["mode"] == taer.get("mode", "pruned")
    assert (preview["experts"] is not None) == has_experts


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({}, 400, None),
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 400, None),
        ({"prompt": ""}, 400, "prompt"),
        ({"prompt": 3}, 400, "prompt"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "robot", "content": "b"}]}, 400, "messages.0.role"),
        ({"prompt": "a", "taer": {"mode": "turbo"}}, 400, "taer.mode"),
        ({"prompt": "a", "taer": {"task": "sort", "mode": "full"}}, 400, None),
        ({"prompt": "a", "taer": {"task": "poetry"}}, 404, None),
        ([1, 2], 400, None),
    ],
)
async def test_a_bad_dry_run_is_refused_in_the_openai_shape(client, body, status, param):
    assert_openai_error(await client.post("/v1/taer/route", json=body), status, param)


async def test_a_lone_surrogate_in_a_dry_run_is_refused(client):
    body = json.dumps({"prompt": "\ud800"})  # escaped as a hostile client sends it
    response = await client.post("/v1/taer/route", content=body, headers={"Content-Type": "application/json"})
    assert_openai_error(response, 400, "prompt")


async def test_the_tcess_tables_cover_every_task(client, engine):
    tables = (await client.get("/v1/taer/tcess")).json()
    assert [p["task"] for p in tables["patterns"]] == engine.task_names()
    for pattern in tables["patterns"]:
        assert len(pattern["tcess"]) == len(tables["layers"]) == len(pattern["retained"])
        assert all(len(row) == tables["num_experts"] for row in pattern["tcess"])
        assert all(len(kept) == tables["experts_per_layer"] for kept in pattern["retained"])
    assert tables["super_experts"] == [{"layer": 0, "expert": 1, "max_abs": 900.0, "layer_median": 3.0}]


async def test_recent_requests_are_listed_newest_first_with_their_routing_tokens_and_latency(client):
    assert (await client.get("/v1/taer/requests")).json() == {
        "requests": [],
        "num_recorded": 0,
        "capacity": 200,
    }
    await client.post("/v1/chat/completions", json=chat_body("arithmetic 1+1", max_tokens=3))
    await client.post("/v1/completions", json={"prompt": "sort this", "taer": {"mode": "exact"}})
    stream = await client.post("/v1/chat/completions", json=chat_body("reverse", stream=True))
    assert stream.status_code == 200
    listed = (await client.get("/v1/taer/requests")).json()
    assert listed["num_recorded"] == 3
    newest, middle, oldest = listed["requests"]
    assert [newest["task"], middle["task"], oldest["task"]] == ["reverse", "sort", "arithmetic"]
    assert (middle["mode"], oldest["mode"]) == ("exact", "pruned")
    assert oldest["completion_tokens"] == 3 and oldest["finish_reason"] == "length"
    assert oldest["similarity"] == 0.9 and oldest["experts_loaded"] == 8 and oldest["prompt_tokens"] > 0
    assert newest["finished_at"] >= middle["finished_at"] >= oldest["finished_at"]
    assert all(r["latency_s"] > 0 and r["request_id"] for r in listed["requests"])


async def test_a_request_that_did_not_finish_is_recorded_as_unfinished(engine):
    engine.fail_next(RuntimeError("boom"), after_tokens=1)
    async with app_client(engine) as client:
        assert (await client.post("/v1/chat/completions", json=chat_body("reverse"))).status_code == 500
        (record,) = (await client.get("/v1/taer/requests")).json()["requests"]
    assert record["finish_reason"] is None and record["task"] == "reverse"


async def test_the_page_is_public_and_every_data_call_needs_the_key():
    async with app_client(FakeEngine(), ServerSettings(api_key="k3y")) as client:
        page = await client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for asset in ("app.js", "api.js", "draw.js", "route.js", "style.css"):
            assert (await client.get(f"/ui/{asset}")).status_code == 200, asset
        assert_openai_error(await client.get("/ui/missing.js"), 404)
        for path in ROUTES:
            method, body = ("POST", {"prompt": "x"}) if path.endswith("route") else ("GET", None)
            assert_openai_error(await client.request(method, path, json=body), 401)
            key = {"Authorization": "Bearer k3y"}
            assert (await client.request(method, path, json=body, headers=key)).status_code == 200, path


async def test_the_page_loads_only_its_own_files():
    async with app_client(FakeEngine()) as client:
        html = (await client.get("/")).text
    assert "http" not in html.replace('xmlns="http', "")  # no CDN, no other origin
    assert '<script type="module" src="/ui/app.js">' in html


async def test_openapi_documents_the_new_routes_and_not_the_page(client):
    openapi = (await client.get("/openapi.json")).json()
    assert {"/v1/taer/route", "/v1/taer/tcess", "/v1/taer/requests"} <= set(openapi["paths"])
    # "/" is there for TGI's POST only: the page (GET) and its files are not API routes.
    assert set(openapi["paths"]["/"]) == {"post"} and not any(p.startswith("/ui") for p in openapi["paths"])
    query = openapi["components"]["schemas"]["RouteQuery"]
    assert [branch["required"] for branch in query["oneOf"]] == [["prompt"], ["messages"]]
    assert query["properties"]["prompt"]["minLength"] == 1
    route = openapi["paths"]["/v1/taer/route"]["post"]
    assert "422" not in route["responses"] and "400" in route["responses"]
    assert route["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("RoutePreview")
