"""Copying experts from the store into device slots.

On the CPU an expert is one read from the page cache straight into its slot. On CUDA each expert is staged
through a ring of pinned host buffers and copied with non-blocking transfers on a side stream, so
the disk/page-cache read of one expert overlaps the host-to-device copy of the previous one and the
compute stream waits only when it needs the experts (``wait``).

Ordering on CUDA, both ways:
- a copy into a slot starts only after the work already queued on the compute stream, which may
  still read the expert the slot held before (an earlier wave of the same forward, the previous
  step); the copies themselves overlap with whatever the compute stream is given after them;
- the compute stream sees the new experts only after ``wait``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from expert_store.keys import ExpertKey
from expert_store.store import ExpertStore, ExpertTensors


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


@dataclass(frozen=True, slots=True)
class _Staging:
    """One pinned host buffer of the ring and the event that marks its last transfer done."""

    gate_up: torch.Tensor  # [2I, D], pinned, the store's dtype
    down: torch.Tensor  # [D, I], pinned
    done: torch.cuda.Event

    def fits(self, tensors: ExpertTensors) -> bool:
        return (self.gate_up.shape, self.down.shape, self.gate_up.dtype) == (
            tensors.gate_up.shape,
            tensors.down.shape,
            tensors.gate_up.dtype,
        )


class ExpertLoader:
    """Puts expert weights into slots; the CUDA path is asynchronous until ``wait``."""

    def __init__(self, device: torch.device, num_staging: int = 4) -> None:
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        self.num_staging = num_staging
        self._ring: list[_Staging] = []
        self._next = 0
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

    def load_from(self, store: ExpertStore, key: ExpertKey, bank: SlotBank, slot: int) -> None:
        """Put ``key``'s expert into ``bank``'s ``slot``. CPU slots of the store's dtype are read into
        directly (1.12x the throughput of copying from a memory map that is then released, measured
        on a 2-core CPU); anything else is copied from the store's memory map."""
        gate_up, down = bank.gate_up[slot], bank.down[slot]
        if not self.is_cuda and store.can_read_into(gate_up) and store.can_read_into(down):
            store.read_into(key, gate_up, down)
            return
        tensors = store.expert(key)
        self.load(bank, slot, tensors)
        del tensors  # the copy is done (CUDA: staged in pinned memory), so the mapped pages can go
        store.release(key)

    def load(self, bank: SlotBank, slot: int, tensors: ExpertTensors) -> None:
        """Copy one expert into ``bank``'s ``slot``. On CUDA the copy is queued: call ``wait`` before
        the compute stream reads the slot."""
        if not self.is_cuda:
            bank.gate_up[slot].copy_(tensors.gate_up)
            bank.down[slot].copy_(tensors.down)
            return
        staging = self._staging_buffer(tensors)
        staging.gate_up.copy_(tensors.gate_up)  # page cache -> pinned host memory
        staging.down.copy_(tensors.down)
        # The slot's previous expert may still be read by kernels queued on the compute stream.
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            # A store dtype other than the slots' is converted on the device, on this stream.
            bank.gate_up[slot].copy_(staging.gate_up, non_blocking=True)
            bank.down[slot].copy_(staging.down, non_blocking=True)
            staging.done.record(self._stream)
        # The slots belong to the compute stream's allocations: should they be freed while a copy
        # is pending, the allocator must not hand their memory out before the copy is done.
        bank.gate_up.record_stream(self._stream)
        bank.down.record_stream(self._stream)

    def wait(self) -> None:
        """Make the current stream wait for every copy issued so far (the host does not block)."""
        if self.is_cuda:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)

    def _staging_buffer(self, tensors: ExpertTensors) -> _Staging:
        if not self._ring or not self._ring[0].fits(tensors):
            self._allocate_ring(tensors)
        staging = self._ring[self._next]
        self._next = (self._next + 1) % len(self._ring)
        staging.done.synchronize()  # the buffer's previous transfer must finish before it is rewritten
        return staging

    def _allocate_ring(self, tensors: ExpertTensors) -> None:
        for staging in self._ring:  # experts of another shape: no transfer may still read the old ring
            staging.done.synchronize()
        self._ring = [
            _Staging(
                gate_up=torch.empty(tensors.gate_up.shape, dtype=tensors.gate_up.dtype, pin_memory=True),
                down=torch.empty(tensors.down.shape, dtype=tensors.down.dtype, pin_memory=True),
                done=torch.cuda.Event(),
            )
            for _ in range(self.num_staging)
        ]
        self._next = 0
