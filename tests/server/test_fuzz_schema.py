"""Schema-driven fuzzing (schemathesis) of a real `taer serve` of the tiny model, from its own
``/openapi.json``: a thousand cases over every route, positive and negative, sent by concurrent
clients. No 5xx (nor a server error inside a stream), every 4xx in the OpenAI error shape, and the
server healthy afterwards with the same greedy answer as before. `taer bench fuzz` runs the long
version."""

from __future__ import annotations

import json

import httpx
import pytest
from tiny_server import tiny_serve_spec

from benchmarks.fuzz import FuzzSettings, response_problem, run_against
from benchmarks.servers import ServerProcess

OPENAI_ERROR = {"error": {"message": "m", "type": "invalid_request_error", "param": None, "code": None}}


@pytest.mark.slow
def test_a_thousand_schema_cases_find_no_5xx_and_leave_the_server_as_it_was(tmp_path):
    with ServerProcess(tiny_serve_spec("fuzz"), tmp_path / "taer.log") as server:
        openapi = httpx.get(f"{server.spec.base_url}/openapi.json", timeout=30).json()
        report = run_against(server.spec.base_url, FuzzSettings(cases=1000, seed=0, clients=8))
        log = server.log_tail(100_000)
    result = report["result"]
    routes = {f"{method.upper()} {path}" for path, item in openapi["paths"].items() for method in item}
    assert set(result["routes"]) == routes and len(routes) == 13
    assert result["cases"] == 1000
    assert result["server_errors"] == 0 and result["findings"] == 0, json.dumps(result["examples"], indent=1)
    served = sum(n for counts in result["statuses"].values() for status, n in counts.items() if status == 200)
    assert served >= 200, result["statuses"]  # the engine generated, not only the validators answered
    assert report["healthy_after"] and report["greedy_answer_unchanged"]
    assert "unexpected error" not in log and "engine step failed" not in log


@pytest.mark.parametrize(
    ("status", "content_type", "text"),
    [
        (500, "application/json", json.dumps(OPENAI_ERROR)),
        (503, "text/plain", "busy"),
        (400, "application/json", json.dumps({"detail": "bad"})),
        (404, "text/plain", "not found"),
        (400, "application/json", json.dumps({"error": {"message": "m", "type": "t"}})),
        (422, "application/json", json.dumps({"error": {**OPENAI_ERROR["error"], "param": 3}})),
        (
            200,
            "text/event-stream; charset=utf-8",
            'data: {"x": 1}\n\ndata: {"error": {"message": "m", "type": "server_error", "param": null, '
            '"code": null}}\n\ndata: [DONE]\n\n',
        ),
    ],
)
def test_the_checker_reports_each_broken_rule(status, content_type, text):
    assert response_problem(status, content_type, text) is not None


@pytest.mark.parametrize(
    ("status", "content_type", "text"),
    [
        (400, "application/json", json.dumps(OPENAI_ERROR)),
        (429, "application/json", json.dumps({"error": {**OPENAI_ERROR["error"], "code": "queue_full"}})),
        (200, "text/event-stream", 'data: {"choices": []}\n\ndata: [DONE]\n\n'),
        (200, "application/json", "{}"),
    ],
)
def test_the_checker_passes_good_responses(status, content_type, text):
    assert response_problem(status, content_type, text) is None
