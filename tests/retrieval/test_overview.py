"""What the web page is drawn from, on a synthetic pattern set: ``PatternRouter.explain`` gives the
routes ``route`` gives with the vote behind each, and ``pattern_tables`` every pattern's TCESS and
retained set in decoder-layer terms, with the super experts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrieval.index import IndexSettings, TaskIndex
from retrieval.overview import SuperExpertView, pattern_tables
from retrieval.patterns import PatternSet, build_pattern_set
from retrieval.selection import Budget
from retrieval.service import PatternRouter, RouteRequest
from retrieval.tcess import SuperExpert, TaskStatsAccumulator, pool

MOE_LAYERS = [1, 2, 3]  # decoder layer 0 is dense
KEYWORDS = ("add", "reverse", "sort")


class KeywordEncoder:
    """One dimension per keyword, plus one for anything else: enough to retrieve by."""

    dim = len(KEYWORDS) + 1
    fingerprint = None

    def encode(self, texts: list[str]) -> np.ndarray:
        vectors = np.array([[*(t.count(k) for k in KEYWORDS), 0.1] for t in texts], dtype=np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def make_set(num_experts: int = 8) -> PatternSet:
    gen = torch.Generator().manual_seed(0)
    accumulators = {}
    for task in ("add", "reverse"):
        accumulator = TaskStatsAccumulator(len(MOE_LAYERS), num_experts, top_k=2, ka=3)
        for row in range(len(MOE_LAYERS)):
            accumulator.add(row, torch.randn(25, num_experts, generator=gen) * 3)
        accumulators[task] = accumulator
    stats = {task: a.finalize() for task, a in accumulators.items()}
    return build_pattern_set(
        "tiny:sha256:0",
        stats,
        pool(list(accumulators.values())).finalize(),
        super_experts={task: [SuperExpert(1, 5, 123.5, 2.25)] for task in [*stats, "general"]},
        always_keep={0: {7}},
        metadata={"moe_layers": MOE_LAYERS},
    )


@pytest.fixture(scope="module")
def router() -> PatternRouter:
    texts = ["add 1 and 2", "add these", "please add", "reverse abc", "reverse this", "reverse it"]
    index = TaskIndex.from_vectors(
        KeywordEncoder(),
        KeywordEncoder().encode(texts),
        [t.split()[0] if t.startswith(("add", "reverse")) else "add" for t in texts],
        texts,
        settings=IndexSettings(projection_shrinkage=None),
    )
    return PatternRouter(make_set(), Budget(experts_per_layer=3), index)


def test_explain_gives_the_routes_of_route_with_the_vote_behind_them(router):
    asked = [
        RouteRequest("reverse abc please"),
        RouteRequest("add 3 and 4, add them", mode="exact"),
        RouteRequest("anything", task="add"),
        RouteRequest("reverse", mode="full"),
        RouteRequest("zzz"),
    ]
    explained = router.explain(asked)
    routes = router.route(asked)
    assert (
        [e.route.task for e in explained]
        == [r.task for r in routes]
        == ["reverse", "add", "add", None, "general"]
    )
    assert [e.route.selection for e in explained] == [r.selection for r in routes]
    first = explained[0].retrieval
    assert first.task == first.candidate == "reverse" and not first.is_fallback
    assert {n.task for n in first.neighbours} >= {"reverse"} and first.neighbours[0].task == "reverse"
    assert explained[2].retrieval is None and explained[3].retrieval is None  # forced, full model
    assert explained[4].retrieval.is_fallback  # unlike anything stored: general serves


def test_the_tables_hold_every_patterns_tcess_and_retained_set_in_decoder_layers(router):
    tables = pattern_tables(router)
    assert tables.layers == MOE_LAYERS and tables.num_experts == 8 and tables.top_k == 2
    assert (tables.budget, tables.experts_per_layer) == ("experts_per_layer=3", 3)
    assert [p.task for p in tables.patterns] == ["add", "reverse", "general"]
    for table in tables.patterns:
        stats = router.patterns.get(table.task).stats
        assert torch.allclose(torch.tensor(table.tcess), stats.tcess, atol=1e-5, rtol=0)
        assert table.retained == [list(router.selection(table.task)[layer]) for layer in MOE_LAYERS]
        assert 7 in table.retained[0] and 5 in table.retained[1]  # always-keep, super expert
        assert table.num_tokens == stats.num_tokens
    # The super expert of MoE row 1 is decoder layer 2; it is listed once although every pattern has it.
    assert tables.super_experts == [SuperExpertView(2, 5, 123.5, 2.25)]
    assert tables.always_keep == {1: [7]}
