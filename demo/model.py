"""The demo model's shape: a small Qwen3-MoE, built from transformers' own implementation."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from transformers import GenerationConfig, PreTrainedTokenizerBase, Qwen3MoeConfig, Qwen3MoeForCausalLM


@dataclass(frozen=True, slots=True)
class DemoModelConfig:
    """Sizes of the demo MoE. Every layer is sparse (no dense MLP layers)."""

    num_layers: int = 4
    hidden_size: int = 192
    num_heads: int = 6
    num_kv_heads: int = 2
    num_experts: int = 16
    experts_per_token: int = 2
    expert_intermediate_size: int = 256
    # Qwen3-MoE's own default; 0.01 balanced experts so evenly that tasks shared most of them.
    router_aux_loss_coef: float = 0.001
    max_position_embeddings: int = 512

    def __post_init__(self) -> None:
        assert self.hidden_size % self.num_heads == 0, "hidden_size must divide into heads"
        assert self.num_heads % self.num_kv_heads == 0, "heads must divide into key/value groups"
        assert 0 < self.experts_per_token <= self.num_experts

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def hf_config(self, tokenizer: PreTrainedTokenizerBase) -> Qwen3MoeConfig:
        """The transformers config for this shape and ``tokenizer``'s vocabulary and special ids."""
        return Qwen3MoeConfig(
            vocab_size=len(tokenizer),
            hidden_size=self.hidden_size,
            intermediate_size=self.expert_intermediate_size * self.experts_per_token,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.hidden_size // self.num_heads,
            max_position_embeddings=self.max_position_embeddings,
            num_experts=self.num_experts,
            num_experts_per_tok=self.experts_per_token,
            moe_intermediate_size=self.expert_intermediate_size,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            router_aux_loss_coef=self.router_aux_loss_coef,
            output_router_logits=False,
            # Untied, like the large Qwen3-MoE checkpoints the pipeline targets.
            tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
            dtype="float32",
        )


def build_model(config: DemoModelConfig, tokenizer: PreTrainedTokenizerBase) -> Qwen3MoeForCausalLM:
    """A freshly initialised demo model (seed torch first for reproducible weights)."""
    model = Qwen3MoeForCausalLM(config.hf_config(tokenizer))
    model.generation_config = generation_config(tokenizer)
    return model


def generation_config(tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """Greedy decoding that stops at the tokenizer's end-of-turn token."""
    return GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=64,
    )
