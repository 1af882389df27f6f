"""``--fallback``: in pruned mode, a query like nothing stored is served by the general pattern,
exact mode or the full model; a query like a stored task is not affected."""

from __future__ import annotations

import pytest
from engine_helpers import greedy_request, started_engine
from pipeline import build_pipeline

from retrieval.service import RouteRequest
from server.loading import ServeConfig, load_engine_parts

TASK_QUERY = "What is 3 plus 10? Add the two numbers."
UNRELATED = "What is the capital of France?"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return build_pipeline(tmp_path_factory.mktemp("fallback"))


@pytest.mark.parametrize(
    ("fallback", "task", "mode", "has_selection"),
    [
        ("general", "general", "pruned", True),
        ("exact", "general", "exact", True),
        ("full", None, "full", False),
    ],
)
def test_an_unrelated_query_is_served_by_the_fallback(pipeline, fallback, task, mode, has_selection):
    store, patterns = pipeline
    router = load_engine_parts(ServeConfig(store, patterns, keep=0.5, fallback=fallback)).router
    unrelated, related, forced = router.explain(
        [RouteRequest(UNRELATED), RouteRequest(TASK_QUERY), RouteRequest(UNRELATED, mode="exact")]
    )
    assert unrelated.retrieval.is_fallback
    assert (unrelated.route.task, unrelated.route.mode) == (task, mode)
    assert (unrelated.route.selection is not None) == has_selection
    assert unrelated.route.similarity == unrelated.retrieval.similarity  # still reported
    assert (related.route.task, related.route.mode) == ("arithmetic", "pruned")
    assert forced.route.mode == "exact"  # a mode the client chose is kept


@pytest.mark.anyio
async def test_a_full_fallback_answers_as_the_full_model(pipeline):
    store, patterns = pipeline
    answers = {}
    for fallback, mode in (("full", None), ("general", "full")):
        engine = await started_engine(ServeConfig(store, patterns, keep=0.5, fallback=fallback))
        try:
            request = greedy_request(engine.tokenizer, fallback, UNRELATED, 8)
            if mode is not None:
                request.taer = type(request.taer)(mode=mode)
            outputs = [o async for o in engine.generate(request)]
        finally:
            await engine.shutdown()
        assert outputs[0].routing.mode == "full" and outputs[0].routing.task is None
        answers[fallback] = [t for o in outputs for t in o.token_ids]
    assert answers["full"] == answers["general"]  # the fallback's answer is the full model's
