"""A faster CPU training path for transformers' 3-D expert tensors, numerically the same computation.

transformers' eager experts loop indexes ``gate_up_proj[e]`` once per expert; on the backward pass
each index writes a zero gradient the size of the whole 3-D parameter, so the cost grows with the
square of the expert count. Unbinding the parameter once and running each expert on its tokens,
grouped by a sort, gives the same outputs and gradients several times faster on the CPU. (The
``grouped_mm`` implementation transformers picks by default falls back to a slow loop off the GPU.)

Only the demo's training uses this, and only while training: the saved checkpoint is plain.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

# Expert blocks with the same 3-D layout and forward contract (DeepSeek-V3's is Qwen3-MoE's).
_EXPERT_BLOCKS = (Qwen3MoeExperts, DeepseekV3Experts)


def grouped_experts_forward(
    self: Qwen3MoeExperts,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Same contract as ``Qwen3MoeExperts.forward``. T = tokens, K = top-k, D = hidden, E = experts."""
    top_k = top_k_index.shape[1]
    flat_experts = top_k_index.reshape(-1)  # [T*K]
    order = flat_experts.argsort(stable=True)  # [T*K], grouped by expert
    token_of = order // top_k  # [T*K]
    counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()  # [E]
    routed = hidden_states[token_of]  # [T*K, D]
    gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
    outputs = []
    for expert, chunk in enumerate(routed.split(counts)):
        if counts[expert]:
            gate, up = F.linear(chunk, gate_up[expert]).chunk(2, dim=-1)  # [n, I] each
            outputs.append(F.linear(self.act_fn(gate) * up, down[expert]))  # [n, D]
    weighted = torch.cat(outputs) * top_k_weights.reshape(-1)[order, None]  # [T*K, D]
    return torch.zeros_like(hidden_states).index_add_(0, token_of, weighted.to(hidden_states.dtype))


@contextmanager
def grouped_experts(model: nn.Module) -> Iterator[int]:
    """Run every Qwen3-MoE or DeepSeek-V3 experts block of ``model`` through :func:`grouped_experts_forward`.

    Yields the number of blocks switched; the class's own forward is back on exit.
    """
    blocks = [m for m in model.modules() if isinstance(m, _EXPERT_BLOCKS)]
    for block in blocks:
        block.forward = types.MethodType(grouped_experts_forward, block)
    try:
        yield len(blocks)
    finally:
        for block in blocks:
            del block.forward
