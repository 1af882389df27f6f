"""Every pattern as a picture would show it: the TCESS table, the retained set under the router's
budget, and the experts every pattern keeps. What ``GET /v1/taer/tcess`` answers and the web page
draws; plain lists (not tensors), in decoder-layer terms like the router's selections.
"""

from __future__ import annotations

from dataclasses import dataclass

from retrieval.service import PatternRouter

TCESS_DIGITS = 5
"""Decimals kept of each TCESS value: a picture needs no more, and a DeepSeek-V3-sized table
(58 x 256) is about 120 kB of JSON per task."""


@dataclass(frozen=True, slots=True)
class PatternTable:
    """One task's pattern: ``tcess[i][e]`` for the i-th MoE layer and expert ``e``; ``retained[i]``
    the experts that layer keeps under the budget, best first."""

    task: str
    num_tokens: int
    tcess: list[list[float]]
    retained: list[list[int]]


@dataclass(frozen=True, slots=True)
class SuperExpertView:
    """An expert with rare, huge outputs (``max_abs``, against its layer's median): every retained
    set holds it. ``layer`` is a decoder layer."""

    layer: int
    expert: int
    max_abs: float
    layer_median: float


@dataclass(frozen=True, slots=True)
class PatternTables:
    """Every pattern (``general`` last). ``layers``: the decoder layers of the tables' rows;
    ``always_keep``: decoder layer -> experts the user marked to keep in every pattern."""

    layers: list[int]
    num_experts: int
    top_k: int
    budget: str
    experts_per_layer: int
    patterns: list[PatternTable]
    super_experts: list[SuperExpertView]
    always_keep: dict[int, list[int]]


def pattern_tables(router: PatternRouter) -> PatternTables:
    """The tables of every task the router serves, under its budget."""
    patterns, layers = router.patterns, router.moe_layers
    general = patterns.general.stats
    return PatternTables(
        layers=layers,
        num_experts=general.num_experts,
        top_k=general.top_k,
        budget=router.budget.describe(),
        experts_per_layer=router.budget.per_layer(general.num_experts),
        patterns=[_table(router, task) for task in router.task_names],
        super_experts=_super_experts(router),
        always_keep={layers[row]: sorted(experts) for row, experts in sorted(patterns.always_keep.items())},
    )


def _table(router: PatternRouter, task: str) -> PatternTable:
    stats = router.patterns.get(task).stats
    selection = router.selection(task)
    return PatternTable(
        task=task,
        num_tokens=stats.num_tokens,
        tcess=[[round(v, TCESS_DIGITS) for v in row] for row in stats.tcess.tolist()],  # [L][E]
        retained=[list(selection[layer]) for layer in router.moe_layers],
    )


def _super_experts(router: PatternRouter) -> list[SuperExpertView]:
    """Each super expert once (calibration gives every pattern the same ones)."""
    seen: dict[tuple[int, int], SuperExpertView] = {}
    for pattern in router.patterns:
        for expert in pattern.super_experts:
            layer = router.moe_layers[expert.layer]
            seen.setdefault(
                (layer, expert.expert),
                SuperExpertView(layer, expert.expert, expert.max_abs, expert.layer_median),
            )
    return [seen[key] for key in sorted(seen)]
