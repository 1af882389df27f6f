"""A model served from a store: dense weights resident, a fixed number of expert slots per MoE layer.

The model is the family's own transformers implementation, built with meta parameters; dense
weights are loaded from the store onto the device, and in every MoE block the router and experts are
replaced by ``RoutedGate`` and ``SlottedExperts``. The whole model is never materialised. The result
works with the usual ``model.generate`` (KV cache, batching with padding).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, GenerationConfig

from expert_store.cache import ActivationReport, ExpertCache
from expert_store.errors import BudgetError, StoreError
from expert_store.families import get_family
from expert_store.loader import ExpertLoader, SlotBank
from expert_store.modes import RoutingMode
from expert_store.modules import RoutedGate, RouterObserver, SlotResolver, SlottedExperts
from expert_store.safetensors_file import DTYPES
from expert_store.skeleton import MoELayout, empty_model, moe_blocks
from expert_store.store import ExpertStore, Verify

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """How to load a store. Give at most one of ``slots_per_layer`` and ``expert_memory`` (bytes);
    with neither, every expert gets a slot."""

    device: str = "cpu"
    dtype: str | None = None  # None: the store's dtype
    slots_per_layer: int | None = None
    expert_memory: int | None = None
    verify: Verify = "first"

    def __post_init__(self) -> None:
        if self.slots_per_layer is not None and self.expert_memory is not None:
            raise BudgetError("give either slots_per_layer or expert_memory, not both")
        if self.dtype is not None and self.dtype not in _DTYPE_NAMES:
            raise BudgetError(f"unknown dtype {self.dtype!r}; use one of {', '.join(_DTYPE_NAMES)}")
        if self.verify not in ("first", "always", "never"):
            raise BudgetError(f"unknown verify policy {self.verify!r}; use first, always or never")


_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def slots_for_budget(layout: MoELayout, bytes_per_expert: int, expert_memory: int) -> int:
    """How many slots per MoE layer ``expert_memory`` bytes hold (at least top-k, at most all)."""
    slots = expert_memory // (bytes_per_expert * len(layout.moe_layers))
    if slots < layout.top_k:
        need = layout.top_k * bytes_per_expert * len(layout.moe_layers)
        raise BudgetError(
            f"expert memory {expert_memory} B holds {slots} expert(s) per layer, fewer than top-k = "
            f"{layout.top_k}; give at least {need} B"
        )
    return min(slots, layout.num_experts)


class MoERuntime:
    """The loaded model, its expert cache and the store it reads from."""

    def __init__(
        self, store: ExpertStore, model: nn.Module, cache: ExpertCache, device: torch.device
    ) -> None:
        self.store = store
        self.model = model
        self.cache = cache
        self.device = device
        self.layout = store.layout
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(self.store.store_dir)
        return self._tokenizer

    @property
    def num_slots(self) -> int:
        return self.cache.num_slots

    def activate(
        self, selection: Mapping[int, Sequence[int]], mode: RoutingMode = "pruned"
    ) -> ActivationReport:
        """Make a selection (MoE layer -> expert ids) resident; see ``ExpertCache.activate``."""
        return self.cache.activate(selection, mode)

    def activate_all(self) -> ActivationReport:
        """Every expert resident, original routing (needs a slot for every expert)."""
        everything = {layer: range(self.layout.num_experts) for layer in self.layout.moe_layers}
        return self.cache.activate(
            everything, "pruned" if self.num_slots == self.layout.num_experts else "exact"
        )

    def set_router_observer(self, observer: RouterObserver | None) -> None:
        for gate in self.gates():
            gate.observer = observer

    def gates(self) -> list[RoutedGate]:
        return [block.gate for block in moe_blocks(self.model).values()]

    def experts_modules(self) -> list[SlottedExperts]:
        return [block.experts for block in moe_blocks(self.model).values()]

    @property
    def expert_dtype(self) -> str:
        """How the slots hold experts: an 8-bit scheme (``int8-channel``) or a dtype (``bfloat16``)."""
        return next(iter(self.cache.banks.values())).dtype_name

    @property
    def dense_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def close(self) -> None:
        self.store.close()


def load_runtime(store_dir: Path, config: RuntimeConfig | None = None) -> MoERuntime:
    """Load a store onto ``config.device`` with dense weights resident and expert slots allocated."""
    config = config or RuntimeConfig()
    device = torch.device(config.device)
    store = ExpertStore(store_dir, verify=config.verify)
    layout = store.layout
    dtype = runtime_dtype(store, config.dtype)
    bytes_per_expert = slot_bytes_per_expert(store, dtype)
    num_slots = config.slots_per_layer or layout.num_experts
    if config.expert_memory is not None:
        num_slots = slots_for_budget(layout, bytes_per_expert, config.expert_memory)
    if not layout.top_k <= num_slots <= layout.num_experts:
        raise BudgetError(
            f"slots_per_layer must be in [top-k = {layout.top_k}, {layout.num_experts}], got {num_slots}"
        )

    banks = {
        layer: SlotBank.allocate(
            num_slots, layout.hidden_size, layout.intermediate_size, dtype, device, store.scheme
        )
        for layer in layout.moe_layers
    }
    cache = ExpertCache(store, banks, ExpertLoader(device), device)
    model = build_model(store, device, dtype, banks, cache)
    logger.info(
        "loaded %s: %d MoE layers x %d slots (%.1f MB of %s experts), dense %.1f MB on %s",
        store.manifest.family,
        len(layout.moe_layers),
        num_slots,
        cache.capacity_bytes / 1e6,
        next(iter(banks.values())).dtype_name,
        sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6,
        device,
    )
    return MoERuntime(store, model, cache, device)


def build_model(
    store: ExpertStore,
    device: torch.device,
    dtype: torch.dtype,
    banks: Mapping[int, SlotBank],
    resolver: SlotResolver,
) -> nn.Module:
    """The family's model with dense weights from ``store`` on ``device`` and, in every MoE block,
    ``RoutedGate`` and ``SlottedExperts`` over ``banks`` (several layers may share one bank)."""
    hf_config = store.config()
    family = get_family(hf_config.model_type)
    model = empty_model(hf_config, dtype=dtype)
    for layer, block in moe_blocks(model).items():
        block.experts = SlottedExperts(layer, banks[layer], block.experts.act_fn, resolver)
        block.gate = RoutedGate(layer, block.gate, family, resolver)
    _load_dense(model, store, device, dtype)
    generation = store.store_dir / "generation_config.json"
    if generation.exists():
        model.generation_config = GenerationConfig.from_pretrained(store.store_dir)
    return model


def slot_bytes_per_expert(store: ExpertStore, dtype: torch.dtype) -> int:
    """Device bytes one expert's slot takes: as stored (8-bit weights and their scales), or the
    full-precision weights in the runtime ``dtype``. ``--expert-memory`` is divided by this."""
    if store.scheme.is_quantized:
        return store.manifest.bytes_per_expert
    return store.layout.params_per_expert * torch.empty((), dtype=dtype).element_size()


def runtime_dtype(store: ExpertStore, name: str | None) -> torch.dtype:
    if name is None:
        return DTYPES[store.manifest.dtype]
    try:
        return _DTYPE_NAMES[name]
    except KeyError:
        raise BudgetError(f"unknown dtype {name!r}; use one of {', '.join(_DTYPE_NAMES)}") from None


def _load_dense(model: nn.Module, store: ExpertStore, device: torch.device, dtype: torch.dtype) -> None:
    # What the family keeps in float32 whatever the model dtype (DeepSeek-V3: its router), matched
    # on the checkpoint's names, as transformers matches them.
    keep_fp32 = tuple(getattr(model, "_keep_in_fp32_modules", None) or ()) + tuple(
        getattr(model, "_keep_in_fp32_modules_strict", None) or ()
    )
    renamed = _gate_renames(model)
    for name, tensor in store.dense_tensors():
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32 if any(part in name for part in keep_fp32) else dtype)
        _assign(model, renamed.get(name, name), tensor.to(device))
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise StoreError(
            f"the store's dense weights lack {len(leftover)} tensor(s), e.g. {leftover[0]}; re-run `taer shard`"
        )
    for name, buffer in model.named_buffers():
        if buffer.device != device:
            _assign(model, name, buffer.to(device))


def _gate_renames(model: nn.Module) -> dict[str, str]:
    """Router tensors now live under ``gate.inner``."""
    renames = {}
    for layer, block in moe_blocks(model).items():
        for name, _ in block.gate.inner.named_parameters(recurse=False):
            renames[f"model.layers.{layer}.mlp.gate.{name}"] = f"model.layers.{layer}.mlp.gate.inner.{name}"
        for name, _ in block.gate.inner.named_buffers(recurse=False):
            renames[f"model.layers.{layer}.mlp.gate.{name}"] = f"model.layers.{layer}.mlp.gate.inner.{name}"
    return renames


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        raise StoreError(f"the store holds {name}, which the model does not have; re-run `taer shard`")
