"""Auxiliary-loss-free load balancing, as DeepSeek-V3 trains its routers.

Each MoE layer's router adds a per-expert bias (``e_score_correction_bias``) to its sigmoid scores
for *selection only* (the gate weights use the unbiased scores). After every optimiser step the bias
of each expert moves by a fixed ``gamma`` towards balance: up when the expert received fewer tokens
than the layer's mean load in that step, down when it received more
(``bias += gamma * sign(mean load - load)``; DeepSeek-V3 report, section 2.1.2, gamma 0.001 for
most of its training). DeepSeek-V3 also adds a sequence-wise balance loss with a tiny weight; the
demo leaves it out, so the bias is the only balancing force.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter


class BiasBalancer:
    """Counts each router's selections while attached; :meth:`update` applies one bias step.

    Use as a context manager around training: ``with BiasBalancer(model, gamma) as balancer:``.
    """

    def __init__(self, model: nn.Module, gamma: float) -> None:
        self.gamma = gamma
        self.routers = [m for m in model.modules() if isinstance(m, DeepseekV3TopkRouter)]
        assert self.routers, "the model has no DeepSeek-V3 routers to balance"
        self.loads = [torch.zeros(r.num_experts) for r in self.routers]  # [E] per router
        self.token_mask: torch.Tensor | None = None  # [R*T] tokens that count, or None for all
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> BiasBalancer:
        for index, router in enumerate(self.routers):
            self._handles.append(router.register_forward_hook(self._counter(index)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _counter(self, index: int):
        def count(module: nn.Module, inputs: object, outputs: tuple[torch.Tensor, ...]) -> None:
            top_k_index = outputs[2]  # [R*T, K]
            if self.token_mask is not None:
                top_k_index = top_k_index[self.token_mask]
            self.loads[index] += torch.bincount(top_k_index.reshape(-1), minlength=module.num_experts)

        return count

    @torch.no_grad()
    def update(self) -> float:
        """Move every router's bias one step towards balance and reset the counts.

        Returns the step's worst imbalance: the largest max-load / mean-load over the routers.
        """
        worst = 0.0
        for router, load in zip(self.routers, self.loads, strict=True):
            mean = load.mean()
            router.e_score_correction_bias += self.gamma * torch.sign(mean - load)
            worst = max(worst, float(load.max() / mean.clamp(min=1)))
            load.zero_()
        return worst
