"""Each family's routing, restricted to an allowed set of experts.

Pruned routing is the original model whose router cannot pick a pruned expert: the pruned experts'
scores are set to -inf before the family's own scoring, selection and renormalisation; top-k is
unchanged. With every expert allowed, these functions compute exactly what the family's
transformers router computes.

Legend: T = tokens, D = hidden, E = experts, K = top-k, G = expert groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from expert_store.families import Family

Routing = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # logits [T, E], weights [T, K], ids [T, K]


def route(family: Family, gate: nn.Module, hidden: torch.Tensor, allowed: torch.Tensor | None) -> Routing:
    """Router logits, top-k weights and top-k expert ids for ``hidden`` [T, D].

    ``allowed`` is a bool mask [E] (None: every expert).
    """
    if family.scoring == "sigmoid_group":
        return _route_sigmoid_group(gate, hidden, allowed)
    return _route_softmax(family, gate, hidden, allowed)


def _route_softmax(
    family: Family, gate: nn.Module, hidden: torch.Tensor, allowed: torch.Tensor | None
) -> Routing:
    logits = F.linear(hidden, gate.weight)  # [T, E]
    masked = logits if allowed is None else logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(masked, dim=-1, dtype=torch.float)  # [T, E]
    weights, ids = torch.topk(probs, gate.top_k, dim=-1)  # [T, K]
    if family.always_norm_topk or getattr(gate, "norm_topk_prob", False):
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if family.weights_in_logits_dtype:
        weights = weights.to(logits.dtype)
    return logits, weights, ids


def own_choices(family: Family, gate: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """The expert ids [T, K] the model's own routing picks from router ``logits`` [T, E], with no
    expert masked: what a token would use before any pattern restricts it (the router check)."""
    if family.scoring == "sigmoid_group":
        return _select_in_groups(gate, logits.float().sigmoid() + gate.e_score_correction_bias)[0]
    return torch.topk(logits, gate.top_k, dim=-1).indices  # softmax is monotonic


def _select_in_groups(gate: nn.Module, choice: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's group-limited top-k over selection scores ``choice`` [T, E]: the ids [T, K] and
    their scores within the chosen groups [T, K] (-inf where a group-limited pick was impossible)."""
    num_experts, num_groups = gate.num_experts, gate.num_group
    grouped = choice.view(-1, num_groups, num_experts // num_groups)  # [T, G, E/G]
    group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
    group_ids = torch.topk(group_scores, k=gate.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_ids, 1).bool()  # [T, G]
    expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(-1, num_experts)  # [T, E]
    limited = choice.masked_fill(~expert_mask, float("-inf"))
    picked, ids = torch.topk(limited, k=gate.top_k, dim=-1, sorted=False)
    return ids, picked


def _route_sigmoid_group(gate: nn.Module, hidden: torch.Tensor, allowed: torch.Tensor | None) -> Routing:
    """DeepSeek-V3: sigmoid scores; selection on scores + correction bias within the best groups.

    Here "the pruned experts' logits" are their selection scores (sigmoid + bias), set to -inf.
    A token whose best groups hold fewer than K allowed experts would otherwise pick a pruned one;
    for such tokens only, selection falls back to the best allowed experts ignoring groups.
    """
    logits = F.linear(hidden.float(), gate.weight.float())  # [T, E]
    scores = logits.sigmoid()
    choice = scores + gate.e_score_correction_bias  # [T, E]
    if allowed is not None:
        choice = choice.masked_fill(~allowed, float("-inf"))
    ids, picked = _select_in_groups(gate, choice)  # [T, K] x2
    if allowed is not None:
        stuck = picked.isinf().any(dim=-1)  # [T]
        if stuck.any():
            ids[stuck] = torch.topk(choice[stuck], k=gate.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if gate.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return logits, weights * gate.routed_scaling_factor, ids
