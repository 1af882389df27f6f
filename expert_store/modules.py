"""The two modules taer puts into each MoE block of the family's own transformers model.

``RoutedGate`` replaces the block's router: the family's routing, restricted to the cache's active
set in pruned mode, with an optional observer that sees every router logit (calibration).
``SlottedExperts`` replaces the block's experts: it computes exactly what the family's experts
compute, reading weights from device slots and mapping expert ids to slots.

Legend: T = tokens, D = hidden, I = expert intermediate, K = top-k.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import torch
from torch import nn

from expert_store.families import Family
from expert_store.loader import SlotBank
from expert_store.routing import route

# (layer, hidden [T, D], router logits [T, E]) for every forward of every MoE layer.
RouterObserver = Callable[[int, torch.Tensor, torch.Tensor], None]
# (layer, expert, token indices [t], expert output before routing weights [t, D]).
ExpertObserver = Callable[[int, int, torch.Tensor, torch.Tensor], None]


class SlotResolver(Protocol):
    """Where experts sit: the expert cache when serving, a layer streamer when calibrating."""

    def waves(self, layer: int, needed: list[int]) -> Iterator[list[tuple[int, int]]]:
        """(expert, slot) pairs covering ``needed``, loading what is missing, in one or more waves."""

    def allowed(self, layer: int) -> torch.Tensor | None:
        """The router's bool mask [E] of experts it may pick, or None for all."""


class RoutedGate(nn.Module):
    """The family's router over the original gate's parameters, aware of the active set."""

    def __init__(self, layer: int, gate: nn.Module, family: Family, cache: SlotResolver) -> None:
        super().__init__()
        self.layer = layer
        self.inner = gate
        self.top_k = gate.top_k
        self.family = family
        self.cache = cache
        self.observer: RouterObserver | None = None

    def forward(self, hidden: torch.Tensor):
        hidden = hidden.reshape(-1, hidden.shape[-1])  # [T, D]
        allowed = self.cache.allowed(self.layer)  # None, [E], or [B, E] per sequence
        if allowed is not None and allowed.dim() == 2:
            # tokens are sequence-major (a [B, S, D] batch flattened), so each row covers S tokens
            allowed = allowed.repeat_interleave(hidden.shape[0] // allowed.shape[0], dim=0)  # [T, E]
        logits, weights, ids = route(self.family, self.inner, hidden, allowed)
        if self.observer is not None:
            self.observer(self.layer, hidden, logits)
        return logits, weights, ids


class SlottedExperts(nn.Module):
    """A layer's experts held in device slots; the rest stay in the store until needed."""

    def __init__(self, layer: int, bank: SlotBank, act_fn: nn.Module, cache: SlotResolver) -> None:
        super().__init__()
        self.layer = layer
        self.bank = bank
        self.act_fn = act_fn
        self.cache = cache
        self.output_observer: ExpertObserver | None = None

    def forward(
        self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        # hidden [T, D], top_k_index [T, K], top_k_weights [T, K]
        out = torch.zeros_like(hidden)
        needed = torch.unique(top_k_index).tolist()  # sorted expert ids
        for wave in self.cache.waves(self.layer, needed):
            for expert, slot in wave:
                token_idx, k_pos = torch.where(top_k_index == expert)  # [t], [t]
                gate, up = self.bank.linear(slot, "gate_up", hidden[token_idx]).chunk(2, dim=-1)  # [t, I] x2
                expert_out = self.bank.linear(slot, "down", self.act_fn(gate) * up)  # [t, D]
                if self.output_observer is not None:
                    self.output_observer(self.layer, expert, token_idx, expert_out)
                expert_out = expert_out * top_k_weights[token_idx, k_pos, None]
                out.index_add_(0, token_idx, expert_out.to(out.dtype))
        return out
