"""The prefill's routing, per prompt, for `taer serve --record`: a forward hook on every MoE gate.

Armed for one prefill (:meth:`RoutingTap.arm`, with the batch's attention mask and each prompt's
thresholds), the hooks see each gate's router logits for every token of the batch, before any
routing restriction, and keep per prompt what :func:`retrieval.routing_record.prompt_routing` sums
from its real tokens; :meth:`RoutingTap.collect` returns the tables and removes the hooks. A forward
hook rather than the gate's observer: the observer is the router check's (the batch runner sets
and clears it around a prefill), and the two must not exclude each other.

Legend: P = prompts, S = positions, L = MoE layers, E = experts, t = real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from expert_store.runtime import MoERuntime
from retrieval.routing_record import ScoreRule, prompt_routing


@dataclass(frozen=True, slots=True)
class PromptRouting:
    """Per prompt of one prefill: own top-k counts [P, L, E], s~ sums [P, L, E], tokens [P]."""

    counts: Tensor
    tcess_sums: Tensor
    num_tokens: list[int]


class RoutingTap:
    """See the module docstring."""

    def __init__(self, runtime: MoERuntime) -> None:
        self.gates = runtime.gates()
        self.rows = {layer: row for row, layer in enumerate(runtime.layout.moe_layers)}
        gate = self.gates[0]
        self.is_grouped = gate.family.scoring == "sigmoid_group"
        self.bias = None
        if self.is_grouped:  # the selection bias of sigmoid routers (DeepSeek-V3), per layer
            self.bias = torch.stack([g.inner.e_score_correction_bias.float().cpu() for g in self.gates])
        self._handles: list = []
        self._rule: ScoreRule | None = None
        self._num_positions = 0
        self._layers: dict[int, tuple[Tensor, Tensor]] = {}

    def score_rule(self, ka: int, top_k: int) -> ScoreRule:
        """The rule for patterns of candidate size ``ka`` on this model."""
        if not self.is_grouped:
            return ScoreRule(ka, top_k, "softmax")
        inner = self.gates[0].inner
        return ScoreRule(ka, top_k, "sigmoid_bias", self.bias, inner.num_group, inner.topk_group)

    def arm(self, attention_mask: Tensor, thresholds: Tensor, rule: ScoreRule) -> None:
        """Watch the next forward over ``attention_mask`` [P, S]; ``thresholds`` [P, L] are each
        prompt's r_l."""
        self.disarm()
        num_prompts, length = attention_mask.shape
        positions = attention_mask.bool().reshape(-1).nonzero().squeeze(1)  # [t]
        self._positions = positions
        self._prompt_of = positions // length  # [t]
        self._thresholds = thresholds.to(attention_mask.device)[self._prompt_of]  # [t, L]
        self._num_tokens = attention_mask.sum(dim=1).tolist()
        self._num_prompts, self._num_positions = num_prompts, num_prompts * length
        self._rule, self._layers = rule, {}
        self._handles = [gate.register_forward_hook(self._observe) for gate in self.gates]

    def disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def collect(self) -> PromptRouting | None:
        """The armed prefill's tables (``None`` if some layer was not seen), and the hooks removed."""
        self.disarm()
        layers, self._layers = self._layers, {}
        if len(layers) != len(self.rows):
            return None
        ordered = [layers[row] for row in range(len(self.rows))]
        counts = torch.stack([c for c, _ in ordered], dim=1)  # [P, L, E]
        sums = torch.stack([s for _, s in ordered], dim=1)  # [P, L, E]
        return PromptRouting(counts.cpu(), sums.cpu(), self._num_tokens)

    def _observe(self, gate, inputs, output) -> None:
        logits = output[0]  # [P*S, E]: the unrestricted router logits
        if logits.shape[0] != self._num_positions:  # not the armed prefill's forward
            return
        row = self.rows[gate.layer]
        self._layers[row] = prompt_routing(
            logits.index_select(0, self._positions),
            self._prompt_of,
            self._num_prompts,
            self._thresholds[:, row],
            self._rule,
            row,
        )
