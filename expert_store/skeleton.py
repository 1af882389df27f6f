"""The family's own transformers model, built without materialising its weights.

Parameters are created on the meta device (no memory); buffers such as rotary frequencies are
computed for real, because they are not in checkpoints. The module tree then tells which layers are
MoE layers and the shapes of their experts, for any family transformers implements.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from expert_store.errors import CheckpointError


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every ``nn.Parameter`` registered inside lands on the meta device; buffers stay real."""
    original = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            kwargs = {"requires_grad": param.requires_grad}
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def empty_model(config: PretrainedConfig, dtype: torch.dtype | None = None) -> nn.Module:
    """The family's causal LM with meta parameters, in eval mode."""
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


@dataclass(frozen=True, slots=True)
class MoELayout:
    """Which decoder layers route to experts, and the experts' shapes."""

    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int

    @property
    def params_per_expert(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    def to_json(self) -> dict:
        return {
            "moe_layers": list(self.moe_layers),
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
        }

    @classmethod
    def from_json(cls, data: dict) -> MoELayout:
        return cls(
            moe_layers=tuple(data["moe_layers"]),
            num_experts=data["num_experts"],
            top_k=data["top_k"],
            hidden_size=data["hidden_size"],
            intermediate_size=data["intermediate_size"],
        )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise CheckpointError(
            f"{type(model).__name__} has no model.layers; taer needs a decoder-only causal LM"
        )
    return layers


def moe_blocks(model: nn.Module) -> dict[int, nn.Module]:
    """Decoder layer index -> its sparse MoE block (the module holding ``experts`` and ``gate``)."""
    blocks = {}
    for index, layer in enumerate(decoder_layers(model)):
        mlp = getattr(layer, "mlp", None)
        experts = getattr(mlp, "experts", None)
        if experts is not None and hasattr(mlp, "gate"):
            blocks[index] = mlp
    return blocks


def moe_layout(model: nn.Module) -> MoELayout:
    blocks = moe_blocks(model)
    if not blocks:
        raise CheckpointError(f"{type(model).__name__} has no routed experts: not an MoE model")
    first = next(iter(blocks.values()))
    num_experts, _, hidden = first.experts.gate_up_proj.shape  # [E, 2I, D]
    intermediate = first.experts.down_proj.shape[-1]  # [E, D, I]
    return MoELayout(
        moe_layers=tuple(blocks),
        num_experts=num_experts,
        top_k=first.gate.top_k,
        hidden_size=hidden,
        intermediate_size=intermediate,
    )


def dense_keys(model: nn.Module) -> set[str]:
    """State-dict names of everything but the routed experts (what ``dense`` shards hold)."""
    expert_prefixes = tuple(f"model.layers.{i}.mlp.experts." for i in moe_blocks(model))
    return {name for name in model.state_dict() if not name.startswith(expert_prefixes)}
