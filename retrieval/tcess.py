"""TCESS: the task-conditioned expected selection score, accumulated batch by batch.

For a token at MoE layer l with router scores s (one per expert) and the model's top-k (PreMoe, with
the fix of its later version):

- A = the Ka highest scores (Ka defaults to top-k); p_i = softmax of s over A only;
- s~_i = f(s_i) if i in A and p_i >= r_l, else 0, where f(s) = max(s, sigmoid(s)) so that a selected
  expert never scores below an unselected one (raw logits can be negative);
- r_l = the mean over the task's tokens of max_i p_i (or a fixed number the caller gives);
- TCESS_i(T, l) = mean of s~_i over all of task T's tokens.

"Scores" are the router logits for softmax routers (Qwen-MoE, Mixtral, OLMoE, gpt-oss). Routers that
score with a sigmoid and select with a bias (DeepSeek-V3) rank experts by ``sigmoid(logits) + bias``,
within the groups that group-limited routing allows; that selection score is what we use wherever the
formula says "logits", so that A is the set the model itself would pick.

Because r_l is a mean over all of the task's tokens, the exact TCESS needs either two passes over the
calibration data or each token's top-Ka scores. We keep the latter (float32 scores and int16 expert
ids, [T, Ka] per layer, on the CPU) and compute everything at ``finalize``. Everything per token is
computed in float32; sums over tokens are accumulated in float64 and the tables stored in float32.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from expert_store.errors import PatternError

logger = logging.getLogger(__name__)

Scoring = Literal["softmax", "sigmoid_bias"]
ThresholdMode = Literal["mean_max_prob", "fixed"]
TableName = Literal["tcess", "frequency", "mean_prob"]
SCORINGS: tuple[str, ...] = get_args(Scoring)
TABLE_NAMES: tuple[str, ...] = get_args(TableName)

# Legend for shape comments: L = layers, E = experts, T = tokens, N = all tokens of a task,
# K = Ka (the candidate set size), K' = max(Ka, top_k).


@dataclass(frozen=True, eq=False)
class TaskStats:
    """What calibration learned about one task (or the pooled ``general`` task).

    ``tcess``, ``frequency`` (fraction of tokens on which the expert is in the model's top-k) and
    ``mean_prob`` (mean router probability: softmax over all logits, or for sigmoid routers the
    sigmoid scores normalised to sum to one) are [layers, experts] float32 tables; ``thresholds`` is r_l
    per layer ([layers] float32).
    """

    tcess: Tensor  # [L, E]
    frequency: Tensor  # [L, E]
    mean_prob: Tensor  # [L, E]
    thresholds: Tensor  # [L]
    num_tokens: int
    top_k: int
    ka: int
    scoring: Scoring
    threshold_mode: ThresholdMode

    def __post_init__(self) -> None:
        shape = self.tcess.shape
        assert len(shape) == 2, f"tables must be [layers, experts], got {tuple(shape)}"
        for name in TABLE_NAMES:
            table = getattr(self, name)
            assert table.shape == shape and table.dtype == torch.float32, f"{name}: {table.shape}"
        assert self.thresholds.shape == (shape[0],) and self.thresholds.dtype == torch.float32

    @property
    def num_layers(self) -> int:
        return self.tcess.shape[0]

    @property
    def num_experts(self) -> int:
        return self.tcess.shape[1]

    def table(self, name: TableName) -> Tensor:
        """One score table by name: ``tcess``, ``frequency`` or ``mean_prob``."""
        if name not in TABLE_NAMES:
            raise ValueError(f"unknown score table {name!r}; expected one of {', '.join(TABLE_NAMES)}")
        return getattr(self, name)


def selection_scores(logits: Tensor, scoring: Scoring, bias: Tensor | None = None) -> Tensor:
    """The scores the router ranks experts by: the logits, or ``sigmoid(logits) + bias``."""
    if scoring == "softmax":
        return logits
    scores = logits.sigmoid()
    return scores if bias is None else scores + bias


def router_probs(logits: Tensor, scoring: Scoring) -> Tensor:
    """Router probabilities over all experts: softmax, or sigmoid scores normalised to sum to one."""
    if scoring == "softmax":
        return logits.softmax(dim=-1)
    scores = logits.sigmoid()
    return scores / scores.sum(dim=-1, keepdim=True)


def limit_to_groups(scores: Tensor, num_groups: int, topk_groups: int) -> Tensor:
    """DeepSeek-V3's group-limited routing: scores outside the best ``topk_groups`` groups become -inf.

    A group's score is the sum of its two best expert scores, as in the model's own router.
    """
    if num_groups == 1:
        return scores
    num_tokens, num_experts = scores.shape
    grouped = scores.view(num_tokens, num_groups, num_experts // num_groups)  # [T, G, E/G]
    group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)  # [T, G]
    best_groups = group_scores.topk(topk_groups, dim=-1).indices  # [T, topk_groups]
    allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)  # [T, G]
    allowed = allowed.unsqueeze(-1).expand_as(grouped).reshape(num_tokens, num_experts)  # [T, E]
    return scores.masked_fill(~allowed, float("-inf"))


def expected_scores(top_scores: Tensor, threshold: Tensor | None) -> tuple[Tensor, Tensor]:
    """s~ for each token's candidates, and the threshold r used.

    ``top_scores`` is [N, K]: each token's Ka best selection scores. With ``threshold`` None, r is the
    mean over the N tokens of max_i p_i.
    """
    probs = top_scores.softmax(dim=-1)  # [N, K]
    if threshold is None:
        threshold = probs.amax(dim=-1).double().mean().float()
    selected = torch.maximum(top_scores, top_scores.sigmoid())  # [N, K]
    return torch.where(probs >= threshold, selected, torch.zeros_like(selected)), threshold


class TaskStatsAccumulator:
    """Collects router scores for one task, batch by batch, and turns them into ``TaskStats``.

    ``layer`` is a row index in [0, num_layers): the caller decides the numbering (the MoE layers in
    order is the natural one) and must feed every layer the same tokens. ``bias`` ([layers, experts] or
    one [experts] tensor per layer) is the selection bias of ``sigmoid_bias`` routers
    (``e_score_correction_bias``); ``num_groups``/``topk_groups`` describe group-limited routing.
    """

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        top_k: int,
        ka: int | None = None,
        scoring: Scoring = "softmax",
        bias: Tensor | Sequence[Tensor] | None = None,
        num_groups: int = 1,
        topk_groups: int | None = None,
    ) -> None:
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.ka = top_k if ka is None else ka
        self.scoring: Scoring = scoring
        self.num_groups = num_groups
        self.topk_groups = num_groups if topk_groups is None else topk_groups
        self.bias = _stack_bias(bias, num_layers, num_experts)
        self._check_settings()
        self._id_dtype = torch.int16 if num_experts <= torch.iinfo(torch.int16).max else torch.int32
        self._scores: list[list[Tensor]] = [[] for _ in range(num_layers)]  # chunks of [T, K] float32
        self._ids: list[list[Tensor]] = [[] for _ in range(num_layers)]  # chunks of [T, K] int16
        self._topk_counts = torch.zeros(num_layers, num_experts, dtype=torch.int64)
        self._prob_sums = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self._num_tokens = [0] * num_layers

    def _check_settings(self) -> None:
        if self.num_layers < 1 or self.num_experts < 1:
            raise ValueError(
                f"need at least one layer and one expert, got {self.num_layers}, {self.num_experts}"
            )
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, {self.num_experts}]")
        if self.scoring not in SCORINGS:
            raise ValueError(f"unknown scoring {self.scoring!r}; expected one of {', '.join(SCORINGS)}")
        if self.bias is not None and self.scoring != "sigmoid_bias":
            raise ValueError("a selection bias only applies to scoring='sigmoid_bias'")
        if self.num_experts % self.num_groups or not 1 <= self.topk_groups <= self.num_groups:
            raise ValueError(f"bad expert groups: {self.num_groups} groups, {self.topk_groups} kept")
        allowed = self.topk_groups * (self.num_experts // self.num_groups)
        if not 1 <= self.ka <= allowed or self.top_k > allowed:
            raise ValueError(f"ka={self.ka} and top_k={self.top_k} must be in [1, {allowed}]")

    def settings(self) -> tuple[int, int, int, int, str, int, int]:
        """Everything but the bias that must match for two accumulators to be pooled."""
        return (
            self.num_layers,
            self.num_experts,
            self.top_k,
            self.ka,
            self.scoring,
            self.num_groups,
            self.topk_groups,
        )

    def empty_like(self) -> TaskStatsAccumulator:
        """A new, empty accumulator with the same settings and bias."""
        return TaskStatsAccumulator(
            self.num_layers,
            self.num_experts,
            self.top_k,
            ka=self.ka,
            scoring=self.scoring,
            bias=self.bias,
            num_groups=self.num_groups,
            topk_groups=self.topk_groups,
        )

    @property
    def num_tokens(self) -> int:
        """Tokens seen so far (the most any layer has seen)."""
        return max(self._num_tokens)

    @property
    def nbytes(self) -> int:
        """Host memory held by the per-token data."""
        return sum(t.nbytes for chunks in (*self._scores, *self._ids) for t in chunks)

    def add(self, layer: int, logits: Tensor) -> None:
        """Record one batch of router logits, [T, E] (or [..., E]) for real (non-padding) tokens only."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.num_layers})")
        if logits.shape[-1] != self.num_experts:
            raise ValueError(f"logits have {logits.shape[-1]} experts, expected {self.num_experts}")
        logits = logits.detach().reshape(-1, self.num_experts).float()  # [T, E]
        if logits.shape[0] == 0:
            return
        bias = None if self.bias is None else self.bias[layer].to(logits.device)
        scores = selection_scores(logits, self.scoring, bias)  # [T, E]
        scores = limit_to_groups(scores, self.num_groups, self.topk_groups)
        top_scores, top_ids = scores.topk(max(self.ka, self.top_k), dim=-1)  # [T, K'], best first
        prob_sums = router_probs(logits, self.scoring).sum(dim=0, dtype=torch.float64).cpu()  # [E]
        if not torch.isfinite(prob_sums).all():  # a NaN logit (or +inf, under softmax) shows up here
            raise PatternError(f"non-finite router logits at layer {layer}; check the checkpoint's dtype")
        self._prob_sums[layer] += prob_sums
        routed = top_ids[:, : self.top_k].flatten()
        self._topk_counts[layer] += torch.bincount(routed, minlength=self.num_experts).cpu()
        # contiguous(): a slice must not keep the whole [T, K'] result alive on the host.
        self._scores[layer].append(top_scores[:, : self.ka].contiguous().cpu())  # [T, K]
        self._ids[layer].append(top_ids[:, : self.ka].to(self._id_dtype).cpu())  # [T, K]
        self._num_tokens[layer] += logits.shape[0]

    def finalize(self, threshold: float | Sequence[float] | None = None) -> TaskStats:
        """Compute the tables. ``threshold``: None for r_l = mean max p, or a fixed r (one or per layer)."""
        num_tokens = self._check_token_counts()
        fixed = _fixed_thresholds(threshold, self.num_layers)
        tcess = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float32)
        thresholds = torch.zeros(self.num_layers, dtype=torch.float32)
        for layer in range(self.num_layers):
            scores, ids = self._consolidate(layer)  # [N, K], [N, K]
            values, thresholds[layer] = expected_scores(scores, None if fixed is None else fixed[layer])
            sums = torch.zeros(self.num_experts, dtype=torch.float64)
            sums.index_add_(0, ids.flatten().long(), values.flatten().double())
            tcess[layer] = (sums / num_tokens).float()
        return TaskStats(
            tcess=tcess,
            frequency=(self._topk_counts.double() / num_tokens).float(),
            mean_prob=(self._prob_sums / num_tokens).float(),
            thresholds=thresholds,
            num_tokens=num_tokens,
            top_k=self.top_k,
            ka=self.ka,
            scoring=self.scoring,
            threshold_mode="mean_max_prob" if fixed is None else "fixed",
        )

    def _check_token_counts(self) -> int:
        counts = set(self._num_tokens)
        if counts == {0}:
            raise PatternError("no calibration tokens were recorded; is the task's prompt file empty?")
        if len(counts) > 1:
            per_layer = ", ".join(f"layer {i}: {n}" for i, n in enumerate(self._num_tokens))
            raise PatternError(f"layers saw different numbers of tokens ({per_layer}); feed every layer")
        return self._num_tokens[0]

    def _consolidate(self, layer: int) -> tuple[Tensor, Tensor]:
        # Replace the chunk list by one tensor so that a second finalize (or pooling) does not copy again.
        # Chunks are never modified in place, so pooled accumulators may share them.
        if len(self._scores[layer]) > 1:
            self._scores[layer] = [torch.cat(self._scores[layer])]
            self._ids[layer] = [torch.cat(self._ids[layer])]
        return self._scores[layer][0], self._ids[layer][0]


def pool(accumulators: Sequence[TaskStatsAccumulator]) -> TaskStatsAccumulator:
    """One accumulator holding every given task's tokens: its ``finalize()`` is the ``general`` pattern.

    The pooled TCESS is recomputed from all tokens together (one threshold r_l over the pooled tokens),
    not averaged from the per-task tables: tasks with more tokens weigh more, as they would in a
    single calibration run over the union of the prompts. Per-token data is shared, not copied.
    """
    if not accumulators:
        raise ValueError("pool() needs at least one accumulator")
    first = accumulators[0]
    pooled = first.empty_like()
    for acc in accumulators:
        if acc.settings() != first.settings() or not _same_bias(acc.bias, first.bias):
            raise ValueError(f"cannot pool accumulators with different settings: {acc.settings()}")
        for layer in range(first.num_layers):
            pooled._scores[layer].extend(acc._scores[layer])
            pooled._ids[layer].extend(acc._ids[layer])
            pooled._num_tokens[layer] += acc._num_tokens[layer]
        pooled._topk_counts += acc._topk_counts
        pooled._prob_sums += acc._prob_sums
    return pooled


def _same_bias(a: Tensor | None, b: Tensor | None) -> bool:
    return a is b or (a is not None and b is not None and torch.equal(a, b))


def _stack_bias(bias: Tensor | Sequence[Tensor] | None, num_layers: int, num_experts: int) -> Tensor | None:
    if bias is None:
        return None
    stacked = bias if isinstance(bias, Tensor) else torch.stack([torch.as_tensor(b) for b in bias])
    if tuple(stacked.shape) != (num_layers, num_experts):
        raise ValueError(f"bias must be [{num_layers}, {num_experts}], got {tuple(stacked.shape)}")
    return stacked.detach().float().cpu()


def _fixed_thresholds(threshold: float | Sequence[float] | None, num_layers: int) -> Tensor | None:
    if threshold is None:
        return None
    values = [float(threshold)] * num_layers if isinstance(threshold, int | float) else list(threshold)
    if len(values) != num_layers or not all(0.0 <= v <= 1.0 for v in values):
        raise PatternError(
            f"a fixed TCESS threshold must be in [0, 1], one or one per layer; got {threshold}"
        )
    return torch.tensor(values, dtype=torch.float32)


@dataclass(frozen=True, slots=True)
class SuperExpert:
    """An expert whose ``down_proj`` output reached ``max_abs``, over ``factor`` x its layer's median."""

    layer: int
    expert: int
    max_abs: float
    layer_median: float

    def to_json(self) -> dict[str, int | float]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> SuperExpert:
        return cls(
            int(data["layer"]), int(data["expert"]), float(data["max_abs"]), float(data["layer_median"])
        )


class SuperExpertTracker:
    """Finds "super experts": the few experts whose rare, huge ``down_proj`` outputs the model relies on.

    The caller feeds, per batch and layer, the max |output| of each expert's ``down_proj``; we keep the
    running max per (layer, expert). An expert is super if its max exceeds ``factor`` x the median of
    the per-expert maxima of its layer. Experts that never received a token (max 0, or NaN fed) are
    left out of the median, so that rarely used layers do not flag every expert.
    """

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self._max_abs = torch.zeros(num_layers, num_experts, dtype=torch.float32)  # [L, E]

    @property
    def max_abs(self) -> Tensor:
        """[layers, experts] running max |down_proj output|; 0 where nothing was seen."""
        return self._max_abs.clone()

    def update(self, layer: int, max_abs: Tensor, expert_ids: Tensor | Sequence[int] | None = None) -> None:
        """Fold in one batch: ``max_abs`` is [E] (all experts) or aligned with ``expert_ids``."""
        values = max_abs.detach().float().abs().flatten().cpu()
        row = self._max_abs[layer]
        if expert_ids is None:
            if values.numel() != row.numel():
                raise ValueError(f"max_abs has {values.numel()} values, expected {row.numel()} experts")
            self._max_abs[layer] = torch.fmax(row, values)  # fmax: a NaN (expert not hit) is ignored
            return
        ids = torch.as_tensor(expert_ids, dtype=torch.long).flatten().cpu()
        if ids.numel() != values.numel():
            raise ValueError(f"{ids.numel()} expert ids for {values.numel()} values")
        row.scatter_reduce_(0, ids, values.nan_to_num(nan=0.0), reduce="amax")  # an id may repeat

    def super_experts(self, factor: float = 10.0) -> list[SuperExpert]:
        """Every (layer, expert) over ``factor`` x its layer's median max, by layer then expert."""
        found: list[SuperExpert] = []
        for layer, row in enumerate(self._max_abs):
            seen = row[row > 0]
            if seen.numel() == 0:
                continue
            median = float(seen.double().quantile(0.5))  # the middle value, or the mean of the two
            for expert in torch.nonzero(row > factor * median).flatten().tolist():
                found.append(SuperExpert(layer, expert, float(row[expert]), median))
        if found:
            names = ", ".join(f"{s.layer}:{s.expert}" for s in found)
            logger.info("super experts (max |down_proj| > %g x layer median): %s", factor, names)
        return found
