"""Synthetic checkpoints with a real large model's expert shapes (random weights, no hub)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import Qwen3MoeConfig

from expert_store.skeleton import empty_model


@dataclass(frozen=True, slots=True)
class SyntheticShape:
    """A Qwen3-MoE checkpoint shape. The default holds about 2.4 GB of bf16 experts (64 x 4 layers x 9.4 MB)."""

    hidden: int = 2048
    intermediate: int = 768
    num_experts: int = 64
    num_layers: int = 4
    top_k: int = 8
    vocab: int = 2048
    dtype: str = "bfloat16"

    def config(self) -> Qwen3MoeConfig:
        return Qwen3MoeConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=4 * self.intermediate,
            moe_intermediate_size=self.intermediate,
            num_hidden_layers=self.num_layers,
            num_attention_heads=16,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=self.num_experts,
            num_experts_per_tok=self.top_k,
            norm_topk_prob=True,
            max_position_embeddings=4096,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            dtype=self.dtype,
        )

    @property
    def expert_bytes(self) -> int:
        return self.num_layers * self.num_experts * 3 * self.hidden * self.intermediate * 2


def make_synthetic_checkpoint(out: Path, shape: SyntheticShape = SyntheticShape(), seed: int = 0) -> Path:
    """Write ``out``/config.json and one model.safetensors per layer group, in the fused layout."""
    out = Path(out)
    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = shape.config()
    dtype = getattr(torch, shape.dtype)
    skeleton = empty_model(config, dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in tqdm(skeleton.state_dict().items(), desc="synthetic checkpoint", unit="tensor"):
        if name.endswith("norm.weight"):
            state[name] = torch.ones(tensor.shape, dtype=dtype)
        else:
            state[name] = (torch.randn(tensor.shape, generator=generator) * 0.02).to(dtype)
    save_file(state, str(out / "model.safetensors"))
    config.save_pretrained(out)
    return out
