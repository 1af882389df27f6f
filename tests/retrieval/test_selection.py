"""Retained sets: exact budgets, always-keep, refusal below top-k, deterministic ties, adaptive rule."""

from __future__ import annotations

import json

import pytest
import torch

from expert_store.errors import BudgetError, SelectionError
from retrieval.selection import (
    Budget,
    Selection,
    layer_counts,
    layer_weights,
    merge,
    random_selection,
    select,
    select_by,
)
from retrieval.tcess import TaskStatsAccumulator


def test_budget_validation_and_rounding():
    for bad in (
        {},
        {"keep": 0.5, "experts_per_layer": 4},
        {"keep": 0.0},
        {"keep": 1.5},
        {"experts_per_layer": 0},
    ):
        with pytest.raises(BudgetError):
            Budget(**bad)
    assert Budget(keep=0.1).per_layer(30) == 3  # 0.1 * 30 = 3.0000000000000004 must not round up to 4
    assert Budget(keep=0.5).per_layer(7) == 4  # a fraction rounds up
    assert Budget(keep=1.0).per_layer(64) == 64
    assert Budget(experts_per_layer=5).per_layer(64) == 5


def test_uniform_keeps_the_best_per_layer():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.7], [5.0, 1.0, 4.0, 2.0, 3.0]])
    selection = select(scores, Budget(experts_per_layer=3), top_k=2)
    assert selection.experts(0) == (1, 2, 4) and selection.experts(1) == (0, 2, 4)
    assert selection.num_experts_total == 6 and selection.layers == (0, 1)


def test_ties_go_to_the_lower_expert_id():
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, 2.0, 0.0]])
    for _ in range(3):
        assert select(scores, Budget(experts_per_layer=3), top_k=1).experts(0) == (1, 2, 3)
    assert select(torch.zeros(1, 6), Budget(experts_per_layer=2), top_k=1).experts(0) == (0, 1)
    # A second table orders the ties first; only its own ties fall back to the expert id.
    second = torch.tensor([[9.0, 0.1, 0.3, 0.3, 0.2, 9.0]])
    assert select(scores, Budget(experts_per_layer=3), top_k=1, tiebreak=second).experts(0) == (2, 3, 4)
    assert select(scores, Budget(experts_per_layer=2), top_k=1, tiebreak=second).experts(0) == (2, 3)
    assert select(scores, Budget(experts_per_layer=4), top_k=1, tiebreak=second).experts(0) == (1, 2, 3, 4)
    with pytest.raises(SelectionError, match="tiebreak"):
        select(scores, Budget(experts_per_layer=2), top_k=1, tiebreak=torch.zeros(2, 6))


def test_always_keep_counts_inside_the_budget():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.7]] * 2)
    selection = select(scores, Budget(experts_per_layer=3), top_k=2, always_keep={1: {0}})
    assert selection.experts(0) == (1, 2, 4)
    assert selection.experts(1) == (0, 1, 4), "expert 0 is kept although it scores lowest"
    with pytest.raises(BudgetError, match="layer 0 has 3 always-keep experts, more than the 2"):
        select(scores, Budget(experts_per_layer=2), top_k=2, always_keep={0: {0, 2, 3}})
    with pytest.raises(SelectionError, match="layer 5"):
        select(scores, Budget(experts_per_layer=3), top_k=2, always_keep={5: {0}})


def test_refuses_a_budget_below_top_k_and_keep_one_keeps_all():
    scores = torch.rand(3, 8)
    with pytest.raises(BudgetError, match=r"keeps 2 experts per layer, fewer than the model's top-k of 4"):
        select(scores, Budget(keep=0.25), top_k=4)
    with pytest.raises(BudgetError, match="asks for 9 experts per layer; the model has 8"):
        select(scores, Budget(experts_per_layer=9), top_k=2)
    everything = select(scores, Budget(keep=1.0), top_k=4, adaptive=True)
    assert all(everything.experts(layer) == tuple(range(8)) for layer in range(3))


def test_adaptive_gives_flatter_layers_more_within_the_same_total():
    peaked = [10.0, 0.1, 0.1, 0.1, 0.0, 0.0, 0.0, 0.0]
    flat = [1.0] * 8
    middle = [4.0, 3.0, 2.0, 1.0, 0.5, 0.0, 0.0, 0.0]
    scores = torch.tensor([peaked, flat, middle])
    counts = layer_counts(scores, Budget(experts_per_layer=4), top_k=2, adaptive=True)
    assert sum(counts) == 12
    assert counts[0] == 2 and counts[1] > counts[2] > counts[0], counts
    selection = select(scores, Budget(experts_per_layer=4), top_k=2, adaptive=True)
    assert [len(selection.experts(layer)) for layer in range(3)] == counts
    assert selection.experts(0) == (0, 1)  # ties among the 0.1s go to the lower id
    # Equal spreads get equal shares: adaptive degenerates to uniform.
    assert layer_counts(torch.ones(4, 8), Budget(keep=0.5), top_k=2, adaptive=True) == [4, 4, 4, 4]
    torch.testing.assert_close(
        layer_weights(torch.tensor([flat, [0.0] * 8])), torch.tensor([8.0, 8.0]).double()
    )


@pytest.mark.parametrize("seed", range(6))
def test_adaptive_total_is_exact_and_bounded(seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(7, 16, generator=gen) ** (
        1 + 10 * torch.rand(7, 1, generator=gen)
    )  # [L, E], mixed spreads
    always_keep = {2: {0, 1, 2, 3, 4}, 5: {15}}
    budget = Budget(keep=0.3)
    selection = select(scores, budget, top_k=3, always_keep=always_keep, adaptive=True)
    counts = [len(selection.experts(layer)) for layer in range(7)]
    assert sum(counts) == budget.per_layer(16) * 7
    assert all(3 <= c <= 16 for c in counts) and counts[2] >= 5
    assert {0, 1, 2, 3, 4} <= set(selection.experts(2)) and 15 in selection.experts(5)


def test_selection_json_union_mask():
    a = Selection({0: (3, 1), 1: [2]})
    b = Selection({1: (0, 2), 2: (5,)})
    assert a.experts(0) == (1, 3)
    assert Selection.from_json(json.loads(json.dumps(a.to_json()))) == a
    assert a.union(b) == Selection({0: (1, 3), 1: (0, 2), 2: (5,)})
    assert {a: "cached"}[Selection({1: {2}, 0: [1, 3]})] == "cached"
    mask = a.to_mask(num_experts=4)
    assert mask.shape == (2, 4) and mask.sum() == 3 and mask[0, 3] and mask[1, 2]
    with pytest.raises(SelectionError, match="no layer 7"):
        a.experts(7)
    with pytest.raises(SelectionError):
        Selection({0: (1, 1)})
    with pytest.raises(SelectionError, match="malformed"):
        Selection.from_json({"zero": [1]})


def test_random_selection_is_reproducible():
    budget = Budget(experts_per_layer=4)
    a = random_selection(3, 16, budget, seed=1, top_k=2, always_keep={0: {15}})
    assert a == random_selection(3, 16, budget, seed=1, top_k=2, always_keep={0: {15}})
    assert a != random_selection(3, 16, budget, seed=2, top_k=2, always_keep={0: {15}})
    assert all(len(a.experts(layer)) == 4 for layer in range(3)) and 15 in a.experts(0)


def test_select_by_baseline_tables_and_merge():
    acc = TaskStatsAccumulator(1, 4, top_k=1)
    acc.add(0, torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0]]))
    stats = acc.finalize()
    assert select_by(stats, Budget(experts_per_layer=1), score="frequency").experts(0) == (1,)
    assert select_by(stats, Budget(experts_per_layer=2), score="mean_prob").experts(0) == (0, 1)
    # Experts 2 and 3 tie at TCESS 0 and at frequency 0; mean_prob tells them apart.
    acc = TaskStatsAccumulator(1, 4, top_k=1)
    acc.add(0, torch.tensor([[5.0, 0.0, -1.0, 1.0], [0.0, 5.0, -1.0, 1.0]]))
    stats = acc.finalize()
    assert stats.tcess[0, 2] == stats.tcess[0, 3] == 0
    assert select_by(stats, Budget(experts_per_layer=3)).experts(0) == (0, 1, 3)

    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    torch.testing.assert_close(merge(a, b, 0.75), torch.tensor([[0.75, 0.25]]))
    with pytest.raises(SelectionError, match="shapes"):
        merge(a, torch.zeros(2, 2), 0.5)
    with pytest.raises(SelectionError, match="weight"):
        merge(a, b, 1.5)
