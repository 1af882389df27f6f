"""The router check in the engine, on a tiny model whose routers separate two tasks: a wrong
retrieval is re-routed before the first token and answers as the right pattern does; a right one is
kept; in a batch, only the re-routed request changes its routing."""

from __future__ import annotations

import asyncio

import pytest
from engine_helpers import greedy_request, started_engine
from pipeline import SEPARABLE_PROMPTS, build_separable_pipeline

from retrieval.calibrate import load_patterns_for_store
from retrieval.router_check import PROFILE_FILE
from retrieval.selection import Budget
from retrieval.service import PatternRouter, Route
from server.engine_api import RoutingInfo, TaerOptions
from server.loading import ServeConfig
from server.metrics import Metrics
from server.request_run import routing_headers

DIGITS = "12+34=46; 56+78=134; 90+12=102; 34+56=90; 11+22="
LETTERS = "reverse the word melon and then spell melon backwards"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return build_separable_pipeline(tmp_path_factory.mktemp("router_check"))


def _retrieved(pipeline, task: str) -> Route:
    """What semantic retrieval would hand the engine had it chosen ``task``."""
    store, patterns = pipeline
    router = PatternRouter(load_patterns_for_store(patterns, store), Budget(keep=0.5))
    return Route(task, "pruned", router.selection(task), similarity=0.9, confidence=0.9)


async def _answer(engine, request, route=None):
    text, routing = "", None
    async for output in engine.generate(request, route):
        text += output.text
        routing = routing or output.routing
    return text, routing


def test_the_fixture_prompts_are_unlike_the_calibration_prompts():
    assert DIGITS not in SEPARABLE_PROMPTS["digits"] and LETTERS not in SEPARABLE_PROMPTS["letters"]


@pytest.mark.anyio
async def test_a_wrong_retrieval_is_rerouted_and_answers_as_the_right_pattern(pipeline):
    metrics = Metrics()
    engine = await started_engine(ServeConfig(*pipeline, keep=0.5), metrics)
    try:
        tokenizer = engine.tokenizer
        wrong, wrong_routing = await _answer(
            engine, greedy_request(tokenizer, "w", DIGITS, 12), _retrieved(pipeline, "letters")
        )
        forced = greedy_request(tokenizer, "f", DIGITS, 12)
        forced.taer = TaerOptions(task="digits")
        right, right_routing = await _answer(engine, forced)
        unchecked = greedy_request(tokenizer, "u", DIGITS, 12)
        unchecked.taer = TaerOptions(task="letters")  # a client's own choice is never second-guessed
        letters_answer, letters_routing = await _answer(engine, unchecked)
    finally:
        await engine.shutdown()
    assert wrong_routing.retrieved_task == "letters" and wrong_routing.checked_task == "digits"
    assert wrong_routing.rerouted is True
    assert (wrong_routing.task, wrong_routing.mode) == ("digits", "pruned"), (
        wrong_routing,
        engine.parts.router.check.thresholds,
    )
    assert wrong_routing.coverage > 0.5
    assert right_routing.rerouted is None and right_routing.task == "digits"
    assert wrong == right
    assert letters_routing.rerouted is None and letters_routing.task == "letters"
    assert letters_answer != right, "the two patterns must answer differently for this test to mean anything"
    exposition = metrics.render().decode()
    assert 'taer_router_checks_total{outcome="rerouted"} 1.0' in exposition


@pytest.mark.anyio
async def test_a_right_retrieval_is_kept(pipeline):
    engine = await started_engine(ServeConfig(*pipeline, keep=0.5))
    try:
        request = greedy_request(engine.tokenizer, "r", LETTERS, 8)
        _, routing = await _answer(engine, request, _retrieved(pipeline, "letters"))
    finally:
        await engine.shutdown()
    assert (routing.task, routing.retrieved_task, routing.checked_task) == ("letters", "letters", "letters")
    assert routing.rerouted is False and routing.mode == "pruned"


@pytest.mark.anyio
async def test_in_a_batch_only_the_rerouted_request_changes(pipeline):
    engine = await started_engine(ServeConfig(*pipeline, keep=0.5))
    try:
        tokenizer = engine.tokenizer
        alone = {}
        for name, text, task in (("d", DIGITS, "digits"), ("l", LETTERS, "letters")):
            alone[name] = await _answer(
                engine, greedy_request(tokenizer, name, text, 10), _retrieved(pipeline, task)
            )
        # together, each retrieved wrongly once: the digits prompt as letters, beside a right letters one
        together = await asyncio.gather(
            _answer(engine, greedy_request(tokenizer, "d2", DIGITS, 10), _retrieved(pipeline, "letters")),
            _answer(engine, greedy_request(tokenizer, "l2", LETTERS, 10), _retrieved(pipeline, "letters")),
        )
    finally:
        await engine.shutdown()
    (digits_text, digits_routing), (letters_text, letters_routing) = together
    assert digits_routing.rerouted is True and digits_routing.task == "digits"
    assert letters_routing.rerouted is False
    assert digits_text == alone["d"][0] and letters_text == alone["l"][0]


@pytest.mark.anyio
async def test_the_check_can_be_turned_off_and_is_off_without_a_profile(pipeline, tmp_path, caplog):
    engine = await started_engine(ServeConfig(*pipeline, keep=0.5, router_check=False))
    try:
        _, routing = await _answer(
            engine, greedy_request(engine.tokenizer, "o", DIGITS, 4), _retrieved(pipeline, "letters")
        )
    finally:
        await engine.shutdown()
    assert routing.task == "letters" and routing.rerouted is None

    store, patterns = pipeline
    copy = tmp_path / "patterns"
    copy.mkdir()
    for path in patterns.iterdir():
        if path.is_file() and path.name != PROFILE_FILE:
            (copy / path.name).write_bytes(path.read_bytes())
    engine = await started_engine(ServeConfig(store, copy, keep=0.5))
    try:
        _, routing = await _answer(
            engine, greedy_request(engine.tokenizer, "p", DIGITS, 4), _retrieved(pipeline, "letters")
        )
    finally:
        await engine.shutdown()
    assert routing.task == "letters" and routing.rerouted is None
    assert any("router check off" in record.getMessage() for record in caplog.records)


def test_headers_say_what_the_check_did():
    routing = RoutingInfo(
        "digits",
        "pruned",
        0.9,
        0.9,
        retrieved_task="letters",
        checked_task="digits",
        rerouted=True,
        coverage=0.8,
    )
    headers = routing_headers(routing)
    assert headers["x-taer-task"] == "digits" and headers["x-taer-retrieved-task"] == "letters"
    assert headers["x-taer-checked-task"] == "digits" and headers["x-taer-rerouted"] == "true"
    kept = routing_headers(RoutingInfo("digits", "pruned", 0.9, 0.9, retrieved_task="digits", rerouted=False))
    assert kept["x-taer-rerouted"] == "false"
