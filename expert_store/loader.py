"""Copying experts from the store's memory map into device slots.

On the CPU an expert is one copy from the page cache into its slot. On CUDA each expert is staged
through a ring of pinned host buffers and copied with non-blocking transfers on a side stream, so
the disk/page-cache read of one expert overlaps the host-to-device copy of the previous one and the
compute stream waits only when it needs the experts (``wait``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from expert_store.store import ExpertTensors


@dataclass(frozen=True, slots=True)
class SlotBank:
    """One MoE layer's expert slots on the device. S = slots, I = expert intermediate, D = hidden."""

    gate_up: torch.Tensor  # [S, 2I, D]
    down: torch.Tensor  # [S, D, I]

    @property
    def num_slots(self) -> int:
        return self.gate_up.shape[0]

    @property
    def nbytes_per_slot(self) -> int:
        return (self.gate_up[0].numel() + self.down[0].numel()) * self.gate_up.element_size()

    @classmethod
    def allocate(
        cls, num_slots: int, hidden: int, intermediate: int, dtype: torch.dtype, device: torch.device
    ):
        return cls(
            gate_up=torch.zeros(num_slots, 2 * intermediate, hidden, dtype=dtype, device=device),
            down=torch.zeros(num_slots, hidden, intermediate, dtype=dtype, device=device),
        )


class ExpertLoader:
    """Puts expert weights into slots; the CUDA path is asynchronous until ``wait``."""

    def __init__(self, device: torch.device, num_staging: int = 4) -> None:
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        self._staging: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._events: list[torch.cuda.Event | None] = []
        self._next = 0
        self._num_staging = num_staging
        self._stream = torch.cuda.Stream(device=self.device) if self.is_cuda else None

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Wrap a run of ``load`` calls. On the CPU the copies run on one thread: a copy is bound by
        memory bandwidth, and intra-op threads that must wait for busy cores make it many times slower."""
        if self.is_cuda:
            yield
            return
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def load(self, bank: SlotBank, slot: int, tensors: ExpertTensors) -> None:
        if not self.is_cuda:
            bank.gate_up[slot].copy_(tensors.gate_up)
            bank.down[slot].copy_(tensors.down)
            return
        gate_up, down, index = self._staging_buffer(tensors)
        gate_up.copy_(tensors.gate_up)  # page cache -> pinned host memory
        down.copy_(tensors.down)
        with torch.cuda.stream(self._stream):
            bank.gate_up[slot].copy_(gate_up, non_blocking=True)
            bank.down[slot].copy_(down, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        self._events[index] = event

    def wait(self) -> None:
        """Make the current stream wait for every copy issued so far."""
        if self.is_cuda:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)

    def _staging_buffer(self, tensors: ExpertTensors) -> tuple[torch.Tensor, torch.Tensor, int]:
        if not self._staging:
            for _ in range(self._num_staging):
                self._staging.append(
                    (
                        torch.empty(tensors.gate_up.shape, dtype=tensors.gate_up.dtype, pin_memory=True),
                        torch.empty(tensors.down.shape, dtype=tensors.down.dtype, pin_memory=True),
                    )
                )
                self._events.append(None)
        index = self._next
        self._next = (self._next + 1) % len(self._staging)
        event = self._events[index]
        if event is not None:
            event.synchronize()  # the buffer's previous transfer must finish before it is rewritten
        gate_up, down = self._staging[index]
        return gate_up, down, index
