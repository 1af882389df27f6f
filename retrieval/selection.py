"""Retained sets: which experts per layer a pattern keeps under a budget.

Uniform selection keeps the same number of experts in every layer, the ones with the highest score.
Ties are broken by an optional second table, then by the lower expert id, so a selection is
deterministic. The second table matters: TCESS credits only experts that pass the confidence
threshold, so often half of a layer's experts score exactly 0, and a generous budget must choose among
them; ``select_by`` and ``PatternSet.select`` use the router's mean probability there. Adaptive selection keeps the same
total but gives more experts to layers whose score mass is spread out:

    weight_l = exp(entropy(q_l)), q_l = max(scores_l, 0) / sum(max(scores_l, 0))

is the effective number of experts the layer uses (1 when one expert takes all the mass, E when the
mass is flat; an all-zero row counts as flat). Layer l gets total * weight_l / sum(weight), clamped to
[max(top_k, |always_keep_l|), E] (the clamped shares are rescaled so that they still sum to the total),
then rounded by largest remainder so that the total is exact.

Always-keep experts (user-marked, super experts) are retained in every layer's set and count inside
its budget. A budget below the model's top-k is refused: pruned routing keeps top-k unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import Tensor

from expert_store.errors import BudgetError, SelectionError
from retrieval.tcess import TableName, TaskStats

AlwaysKeep = Mapping[int, Iterable[int]]

# Legend for shape comments: L = layers, E = experts.


@dataclass(frozen=True, slots=True)
class Budget:
    """How many experts per layer to retain: a fraction ``keep`` in (0, 1] or a count, exactly one."""

    keep: float | None = None
    experts_per_layer: int | None = None

    def __post_init__(self) -> None:
        if (self.keep is None) == (self.experts_per_layer is None):
            raise BudgetError("give exactly one of --keep (a fraction) or --experts-per-layer (a count)")
        if self.keep is not None and not (isinstance(self.keep, int | float) and 0.0 < self.keep <= 1.0):
            raise BudgetError(f"--keep must be a fraction in (0, 1], got {self.keep}")
        count = self.experts_per_layer
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            raise BudgetError(f"--experts-per-layer must be a positive integer, got {count}")

    def per_layer(self, num_experts: int) -> int:
        """Experts per layer. A fraction rounds up (the fuzz absorbs 0.1 * 30 = 3.0000000000000004)."""
        if self.keep is not None:
            return max(1, math.ceil(self.keep * num_experts - 1e-9))
        assert self.experts_per_layer is not None
        return self.experts_per_layer

    def describe(self) -> str:
        return f"keep={self.keep}" if self.keep is not None else f"experts_per_layer={self.experts_per_layer}"


@dataclass(frozen=True)
class Selection:
    """The retained set: layer index -> sorted tuple of expert ids (any iterables are normalised).

    Immutable and hashable, so it can key a cache of device slot plans.
    """

    experts_by_layer: Mapping[int, tuple[int, ...]]

    def __post_init__(self) -> None:
        normalised: dict[int, tuple[int, ...]] = {}
        for layer, experts in sorted(self.experts_by_layer.items()):
            ids = tuple(sorted(int(e) for e in experts))
            if not isinstance(layer, int) or layer < 0 or len(set(ids)) != len(ids) or (ids and ids[0] < 0):
                raise SelectionError(f"bad selection for layer {layer!r}: {list(experts)}")
            normalised[layer] = ids
        object.__setattr__(self, "experts_by_layer", MappingProxyType(normalised))

    def __hash__(self) -> int:
        return hash(tuple(self.experts_by_layer.items()))

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.experts_by_layer)

    @property
    def num_experts_total(self) -> int:
        return sum(len(ids) for ids in self.experts_by_layer.values())

    def experts(self, layer: int) -> tuple[int, ...]:
        """The retained experts of ``layer``, ascending."""
        try:
            return self.experts_by_layer[layer]
        except KeyError:
            raise SelectionError(
                f"the selection has no layer {layer}; it covers {list(self.layers)}"
            ) from None

    def union(self, other: Selection) -> Selection:
        """Per layer, the experts of either selection (what two patterns need resident together)."""
        layers = set(self.experts_by_layer) | set(other.experts_by_layer)
        return Selection(
            {
                layer: set(self.experts_by_layer.get(layer, ())) | set(other.experts_by_layer.get(layer, ()))
                for layer in layers
            }
        )

    def to_mask(self, num_experts: int) -> Tensor:
        """[L, E] bool, True where retained; L = highest layer + 1 (absent layers retain nothing)."""
        mask = torch.zeros(max(self.layers, default=-1) + 1, num_experts, dtype=torch.bool)  # [L, E]
        for layer, ids in self.experts_by_layer.items():
            mask[layer, list(ids)] = True
        return mask

    def to_json(self) -> dict[str, list[int]]:
        return {str(layer): list(ids) for layer, ids in self.experts_by_layer.items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Sequence[int]]) -> Selection:
        try:
            return cls({int(layer): [int(e) for e in ids] for layer, ids in data.items()})
        except (TypeError, ValueError, AttributeError) as error:
            raise SelectionError(f"malformed selection JSON: {error}") from None


def select(
    scores: Tensor,
    budget: Budget,
    *,
    top_k: int,
    always_keep: AlwaysKeep | None = None,
    adaptive: bool = False,
    tiebreak: Tensor | None = None,
) -> Selection:
    """Retain, per layer, the highest-scoring experts of ``scores`` [L, E] under ``budget``.

    Equal scores are ordered by ``tiebreak`` [L, E] (higher first) when given, then by lower expert id.
    """
    counts = layer_counts(scores, budget, top_k=top_k, always_keep=always_keep, adaptive=adaptive)
    keep_sets = _always_keep_sets(always_keep, *scores.shape)
    if tiebreak is not None and tiebreak.shape != scores.shape:
        raise SelectionError(f"tiebreak {tuple(tiebreak.shape)} must match scores {tuple(scores.shape)}")
    rows = scores.tolist()
    seconds = torch.zeros_like(scores).tolist() if tiebreak is None else tiebreak.tolist()
    return Selection(
        {
            layer: _best(rows[layer], seconds[layer], counts[layer], keep_sets[layer])
            for layer in range(len(rows))
        }
    )


def layer_counts(
    scores: Tensor,
    budget: Budget,
    *,
    top_k: int,
    always_keep: AlwaysKeep | None = None,
    adaptive: bool = False,
) -> list[int]:
    """How many experts each layer retains (uniform, or adaptive as the module docstring says)."""
    _check_scores(scores)
    num_layers, num_experts = scores.shape
    per_layer = budget.per_layer(num_experts)
    if per_layer > num_experts:
        raise BudgetError(
            f"{budget.describe()} asks for {per_layer} experts per layer; the model has {num_experts}"
        )
    if per_layer < top_k:
        raise BudgetError(
            f"{budget.describe()} keeps {per_layer} experts per layer, fewer than the model's top-k of "
            f"{top_k}; keep at least {top_k}"
        )
    minimum = [max(top_k, len(keep)) for keep in _always_keep_sets(always_keep, num_layers, num_experts)]
    if not adaptive:
        worst = max(range(num_layers), key=lambda layer: minimum[layer])
        if minimum[worst] > per_layer:
            raise BudgetError(
                f"layer {worst} has {minimum[worst]} always-keep experts, more than the {per_layer} "
                f"that {budget.describe()} allows; raise the budget"
            )
        return [per_layer] * num_layers
    total = per_layer * num_layers
    if sum(minimum) > total:
        raise BudgetError(
            f"the always-keep experts need {sum(minimum)} slots, more than the {total} in budget"
        )
    return _allocate(total, layer_weights(scores).tolist(), minimum, [num_experts] * num_layers)


def layer_weights(scores: Tensor) -> Tensor:
    """[L] exp(entropy) of each layer's normalised non-negative scores: its effective expert count."""
    mass = scores.double().clamp(min=0)  # [L, E]
    totals = mass.sum(dim=1, keepdim=True)  # [L, 1]
    probs = torch.where(totals > 0, mass / totals.clamp(min=1e-300), 1.0 / scores.shape[1])  # [L, E]
    entropy = -torch.where(probs > 0, probs * probs.log(), 0.0).sum(dim=1)  # [L]
    return entropy.exp()


def select_by(
    stats: TaskStats,
    budget: Budget,
    *,
    score: TableName = "tcess",
    top_k: int | None = None,
    always_keep: AlwaysKeep | None = None,
    adaptive: bool = False,
) -> Selection:
    """``select`` over one of a task's tables (``tcess``, or the ``frequency``/``mean_prob`` baselines).

    Ties (TCESS and frequency are 0 for many experts) are broken by ``mean_prob``.
    """
    top_k = stats.top_k if top_k is None else top_k
    return select(
        stats.table(score),
        budget,
        top_k=top_k,
        always_keep=always_keep,
        adaptive=adaptive,
        tiebreak=None if score == "mean_prob" else stats.mean_prob,
    )


def random_selection(
    num_layers: int,
    num_experts: int,
    budget: Budget,
    seed: int,
    top_k: int,
    always_keep: AlwaysKeep | None = None,
) -> Selection:
    """A uniform random retained set (the benchmark's floor), reproducible from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_layers, num_experts, generator=generator)  # [L, E]
    return select(scores, budget, top_k=top_k, always_keep=always_keep)


def merge(scores_a: Tensor, scores_b: Tensor, weight: float) -> Tensor:
    """``weight * a + (1 - weight) * b``: one table for a query whose two best tasks are close.

    ``weight`` is a's share, e.g. sim_a / (sim_a + sim_b). TCESS tables of one model share a scale, so
    no normalisation is applied.
    """
    if scores_a.shape != scores_b.shape:
        raise SelectionError(
            f"cannot merge score tables of shapes {tuple(scores_a.shape)} and {tuple(scores_b.shape)}"
        )
    if not 0.0 <= weight <= 1.0:
        raise SelectionError(f"merge weight must be in [0, 1], got {weight}")
    return weight * scores_a.float() + (1.0 - weight) * scores_b.float()


def _check_scores(scores: Tensor) -> None:
    if scores.dim() != 2 or scores.shape[1] == 0:
        raise SelectionError(f"scores must be [layers, experts], got {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise SelectionError(
            "scores contain NaN or infinity; the pattern is corrupt, re-run `taer calibrate`"
        )


def _always_keep_sets(
    always_keep: AlwaysKeep | None, num_layers: int, num_experts: int
) -> list[frozenset[int]]:
    sets = [frozenset[int]()] * num_layers
    for layer, experts in (always_keep or {}).items():
        ids = frozenset(int(e) for e in experts)
        if not 0 <= layer < num_layers or any(not 0 <= e < num_experts for e in ids):
            raise SelectionError(
                f"always-keep names layer {layer}, experts {sorted(ids)}; the model has {num_layers} MoE "
                f"layers of {num_experts} experts"
            )
        sets[layer] = ids
    return sets


def _best(row: list[float], second: list[float], count: int, keep: frozenset[int]) -> tuple[int, ...]:
    chosen = set(keep)
    for expert in sorted(range(len(row)), key=lambda e: (-row[e], -second[e], e)):
        if len(chosen) >= count:
            break
        chosen.add(expert)
    return tuple(sorted(chosen))


def _allocate(total: int, weights: list[float], low: list[int], high: list[int]) -> list[int]:
    """Integers in [low, high] summing to ``total``, proportional to ``weights`` where the bounds allow."""

    def shares(scale: float) -> list[float]:
        return [min(max(scale * w, lo), hi) for w, lo, hi in zip(weights, low, high, strict=True)]

    # sum(shares(scale)) grows with scale from sum(low) to sum(high); bisect for the scale hitting total.
    below, above = 0.0, max(hi / w for w, hi in zip(weights, high, strict=True))
    for _ in range(200):
        middle = (below + above) / 2
        below, above = (middle, above) if sum(shares(middle)) < total else (below, middle)
    exact = shares(above)
    counts = [min(math.floor(x + 1e-9), hi) for x, hi in zip(exact, high, strict=True)]
    # Largest remainder: hand out (or take back) single experts by fractional part, lower layer first.
    while sum(counts) < total:
        grow = [i for i in range(len(counts)) if counts[i] < high[i]]
        counts[max(grow, key=lambda i: (exact[i] - counts[i], -i))] += 1
    while sum(counts) > total:
        shrink = [i for i in range(len(counts)) if counts[i] > low[i]]
        counts[min(shrink, key=lambda i: (exact[i] - counts[i], i))] -= 1
    return counts
