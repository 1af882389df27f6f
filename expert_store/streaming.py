"""Layer-streamed execution, for calibrating a model larger than the device.

The hidden states of every calibration sequence pass through one decoder layer at a time (as
post-training quantizers do). Only that layer's experts are resident: all MoE layers share one
bank of ``num_experts`` slots, refilled when the stream moves to the next layer, so resident expert
bytes never exceed one layer's. The inputs each decoder layer receives besides the hidden states
(masks, positions, rotary embeddings) are captured from the model's own forward, so any family's
conventions are kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from expert_store.keys import ExpertKey
from expert_store.loader import ExpertLoader, SlotBank
from expert_store.runtime import build_model, runtime_dtype
from expert_store.skeleton import decoder_layers
from expert_store.store import ExpertStore


class LayerStreamer:
    """A slot resolver holding exactly one MoE layer's experts, expert ``e`` in slot ``e``."""

    def __init__(self, store: ExpertStore, bank: SlotBank, device: torch.device) -> None:
        self.store = store
        self.bank = bank
        self.loader = ExpertLoader(device)
        self.current: int | None = None

    def load_layer(self, layer: int) -> None:
        with self.loader.session():
            for expert in range(self.store.layout.num_experts):
                self.loader.load(self.bank, expert, self.store.expert(ExpertKey(layer, expert)))
        self.loader.wait()
        self.current = layer

    def waves(self, layer: int, needed: list[int]) -> Iterator[list[tuple[int, int]]]:
        assert layer == self.current, f"layer {layer} ran while layer {self.current} was resident"
        yield [(expert, expert) for expert in needed]

    def allowed(self, layer: int) -> torch.Tensor | None:
        return None

    @property
    def resident_bytes(self) -> int:
        return self.bank.num_slots * self.bank.nbytes_per_slot if self.current is not None else 0


class _StopForward(Exception):
    pass


@dataclass
class _LayerInputs:
    hidden: torch.Tensor
    kwargs: dict


class StreamedModel:
    """The model's dense weights resident, its experts streamed layer by layer."""

    def __init__(self, store_dir: Path, device: str = "cpu", dtype: str | None = None) -> None:
        self.store = ExpertStore(store_dir)
        self.device = torch.device(device)
        layout = self.store.layout
        torch_dtype = runtime_dtype(self.store, dtype)
        bank = SlotBank.allocate(
            layout.num_experts,
            layout.hidden_size,
            layout.intermediate_size,
            torch_dtype,
            self.device,
            self.store.scheme,
        )
        self.streamer = LayerStreamer(self.store, bank, self.device)
        self.model = build_model(
            self.store, self.device, torch_dtype, dict.fromkeys(layout.moe_layers, bank), self.streamer
        )
        self.peak_resident_bytes = 0

    @torch.no_grad()
    def run(
        self,
        batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        before_batch: Callable[[int], None] | None = None,
    ) -> None:
        """Pass every (input_ids, attention_mask) batch through all decoder layers, layer-major.

        Router and expert observers installed on the model's MoE blocks see every token, as in a
        normal forward; ``before_batch(i)`` is called before batch ``i`` enters each layer.
        """
        states = [self._capture(ids.to(self.device), mask.to(self.device)) for ids, mask in batches]
        layers = decoder_layers(self.model)
        for index, layer in enumerate(tqdm(layers, desc="streaming layers", unit="layer")):
            if index in self.store.layout.moe_layers:
                self.streamer.load_layer(index)
                self.peak_resident_bytes = max(self.peak_resident_bytes, self.streamer.resident_bytes)
            for batch_index, state in enumerate(states):
                if before_batch is not None:
                    before_batch(batch_index)
                output = layer(state.hidden, **state.kwargs)
                state.hidden = output[0] if isinstance(output, tuple) else output

    def _capture(self, ids: torch.Tensor, mask: torch.Tensor) -> _LayerInputs:
        """Run the model up to its first decoder layer and keep what that layer receives."""
        first = decoder_layers(self.model)[0]
        captured: dict = {}

        def catch(module: nn.Module, args: tuple, kwargs: dict):
            captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
            captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            raise _StopForward

        handle = first.register_forward_pre_hook(catch, with_kwargs=True)
        try:
            self.model(input_ids=ids, attention_mask=mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return _LayerInputs(captured["hidden"], captured["kwargs"])

    def close(self) -> None:
        self.store.close()
