"""Tiny random checkpoints of every supported family, built with transformers configs and saved
with ``save_pretrained`` (per-expert layout) or rewritten with transformers 5's fused 3D tensors."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    MixtralConfig,
    OlmoeConfig,
    PretrainedConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3")

_COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny_config(family: str, num_experts: int = 8, top_k: int = 2) -> PretrainedConfig:
    if family == "qwen3_moe":
        return Qwen3MoeConfig(
            **_COMMON,
            num_experts=num_experts,
            num_experts_per_tok=top_k,
            moe_intermediate_size=16,
            head_dim=8,
            norm_topk_prob=True,
        )
    if family == "qwen2_moe":
        return Qwen2MoeConfig(
            **_COMMON,
            num_experts=num_experts,
            num_experts_per_tok=top_k,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            norm_topk_prob=False,
        )
    if family == "mixtral":
        return MixtralConfig(
            **{**_COMMON, "intermediate_size": 16}, num_local_experts=num_experts, num_experts_per_tok=top_k
        )
    if family == "olmoe":
        return OlmoeConfig(
            **{**_COMMON, "intermediate_size": 16}, num_experts=num_experts, num_experts_per_tok=top_k
        )
    if family == "deepseek_v3":
        return DeepseekV3Config(
            **{**_COMMON, "num_key_value_heads": 4},
            n_routed_experts=num_experts,
            num_experts_per_tok=top_k,
            moe_intermediate_size=16,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            n_shared_experts=1,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            rope_interleave=False,
        )
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kwargs), dtype=torch.float32).eval()
    return spread_routers(model)


def spread_routers(model: torch.nn.Module) -> torch.nn.Module:
    """Random init leaves routers near-uniform and biases at zero: spread them so routing matters."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0, 0.5)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.uniform_(-0.1, 0.1)
    return model


def save_tiny(family: str, path: Path, seed: int = 0, fused: bool = False, **kwargs) -> torch.nn.Module:
    """Save a tiny checkpoint to ``path``; ``fused`` writes transformers 5's stacked expert tensors."""
    model = tiny_model(family, seed, **kwargs)
    model.save_pretrained(path)
    if fused:
        (path / "model.safetensors").unlink()
        state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(path / "model.safetensors"))
    return model


def padded_inputs(
    batch: int = 2, seed: int = 0, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) [batch, 12] of random tokens; the second row is left-padded by 4,
    as generate batches prompts of different lengths."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (batch, 12), generator=generator)
    mask = torch.ones_like(ids)
    if batch > 1:
        ids[1, :4] = 0
        mask[1, :4] = 0
    return ids.to(device), mask.to(device)
