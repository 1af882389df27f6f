"""The DeepSeek-V3-family demo's shape: fine-grained routed experts, a shared expert, sigmoid scores
with a correction bias, group-limited routing and a first dense layer, in transformers' own
``DeepseekV3ForCausalLM``.

Sizes are picked for a CPU build of a quarter of an hour or so: the layout of the large checkpoints
(64 routed experts in 8 groups of which 4 may be chosen, top-6, one shared expert as wide as a routed
one, the first layer dense, multi-head latent attention) at a width a small model trains in that time.
The rotary part of the attention keys is 32 wide and the latent KV rank 96, more than DeepSeek-V3's
proportions, because the copying tasks attend by position; a build with 16 and 64 had about the same
loss at the same step, so this is kept as a guess, not a measured gain.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, PreTrainedTokenizerBase

from demo.model import generation_config


@dataclass(frozen=True, slots=True)
class DeepseekModelConfig:
    """Sizes of the DeepSeek-V3-family demo. Layers before ``first_dense_layers`` are dense."""

    num_layers: int = 4
    first_dense_layers: int = 1
    hidden_size: int = 160
    num_heads: int = 4
    dense_intermediate_size: int = 384
    num_experts: int = 64
    experts_per_token: int = 6
    num_groups: int = 8
    groups_per_token: int = 4
    num_shared_experts: int = 1
    expert_intermediate_size: int = 64
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 96
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 32
    v_head_dim: int = 32
    max_position_embeddings: int = 512

    def __post_init__(self) -> None:
        assert 0 < self.first_dense_layers < self.num_layers, "at least one dense and one MoE layer"
        assert self.num_experts % self.num_groups == 0, "experts must divide into groups"
        assert 0 < self.groups_per_token <= self.num_groups
        experts_reachable = self.groups_per_token * (self.num_experts // self.num_groups)
        assert 0 < self.experts_per_token <= experts_reachable, "top-k must fit in the chosen groups"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def hf_config(self, tokenizer: PreTrainedTokenizerBase) -> DeepseekV3Config:
        """The transformers config for this shape and ``tokenizer``'s vocabulary and special ids."""
        return DeepseekV3Config(
            vocab_size=len(tokenizer),
            hidden_size=self.hidden_size,
            intermediate_size=self.dense_intermediate_size,
            moe_intermediate_size=self.expert_intermediate_size,
            num_hidden_layers=self.num_layers,
            first_k_dense_replace=self.first_dense_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads,
            n_routed_experts=self.num_experts,
            num_experts_per_tok=self.experts_per_token,
            n_group=self.num_groups,
            topk_group=self.groups_per_token,
            n_shared_experts=self.num_shared_experts,
            routed_scaling_factor=self.routed_scaling_factor,
            norm_topk_prob=True,
            # No query compression: at this width a low-rank query only loses capacity.
            q_lora_rank=None,
            kv_lora_rank=self.kv_lora_rank,
            qk_nope_head_dim=self.qk_nope_head_dim,
            qk_rope_head_dim=self.qk_rope_head_dim,
            v_head_dim=self.v_head_dim,
            rope_interleave=False,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
            dtype="float32",
        )


def build_deepseek_model(
    config: DeepseekModelConfig, tokenizer: PreTrainedTokenizerBase
) -> DeepseekV3ForCausalLM:
    """A freshly initialised DeepSeek-V3-family demo model (seed torch first for reproducible weights)."""
    model = DeepseekV3ForCausalLM(config.hf_config(tokenizer))
    model.generation_config = generation_config(tokenizer)
    return model
