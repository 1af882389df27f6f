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
import torch.nn.functional as F

from expert_store.keys import ExpertKey
from expert_store.quant import NONE, Scheme
from expert_store.store import ExpertStore, ExpertTensors


@dataclass(frozen=True, slots=True)
class SlotBank:
    """One MoE layer's expert slots on the device, holding experts as the store holds them.
    S = slots, I = expert intermediate, D = hidden.

    An 8-bit ``scheme`` keeps the 8-bit weights and their float32 scales (per output channel, or per
    128x128 block for ``float8-block128``); the expert forward multiplies through one slot at a time
    (``linear``: an int8 kernel where one fits, else dequantized on the fly)."""

    gate_up: torch.Tensor  # [S, 2I, D]
    down: torch.Tensor  # [S, D, I]
    scheme: Scheme = NONE
    gate_up_scale: torch.Tensor | None = None  # [S, 2I] (blocks: [S, 2I/128, D/128]), 8-bit only
    down_scale: torch.Tensor | None = None  # [S, D] (blocks: [S, D/128, I/128]), float32

    @property
    def num_slots(self) -> int:
        return self.gate_up.shape[0]

    @property
    def nbytes_per_slot(self) -> int:
        """Bytes one expert occupies, scales included."""
        return sum(part.nbytes for part in self.stacked()) // self.num_slots

    @property
    def dtype_name(self) -> str:
        """The 8-bit scheme (``int8-channel``) or the slots' dtype (``bfloat16``)."""
        return (
            self.scheme.name if self.scheme.is_quantized else str(self.gate_up.dtype).removeprefix("torch.")
        )

    def parts(self, slot: int) -> tuple[torch.Tensor, ...]:
        """The slot's tensors in ``ExpertTensors.parts()`` order: weights, then scales if any."""
        return tuple(bank[slot] for bank in self.stacked())

    def linear(self, slot: int, part: str, x: torch.Tensor) -> torch.Tensor:
        """``x`` [T, D or I] through the slot's ``gate_up`` or ``down`` weight (``x @ W.T``), in
        ``x``'s dtype: the slot itself when stored in full precision, else the scheme's 8-bit product."""
        weight = getattr(self, part)[slot]
        if not self.scheme.is_quantized:
            return F.linear(x, weight)
        return self.scheme.linear(x, weight, getattr(self, f"{part}_scale")[slot])

    def weights(self, slot: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, D], down [D, I]) of a slot in the compute ``dtype``: the slot itself when
        stored in full precision, dequantized on the fly when 8-bit."""
        if not self.scheme.is_quantized:
            return self.gate_up[slot], self.down[slot]
        return (
            self.scheme.dequantize(self.gate_up[slot], self.gate_up_scale[slot], dtype),
            self.scheme.dequantize(self.down[slot], self.down_scale[slot], dtype),
        )

    def stacked(self) -> tuple[torch.Tensor, ...]:
        """Every slot's tensors together: [S, 2I, D], [S, D, I], then the scales if any."""
        scales = (self.gate_up_scale, self.down_scale)
        return (self.gate_up, self.down, *(t for t in scales if t is not None))

    @classmethod
    def allocate(
        cls,
        num_slots: int,
        hidden: int,
        intermediate: int,
        dtype: torch.dtype,
        device: torch.device,
        scheme: Scheme = NONE,
    ):
        """Slots of ``dtype``, or of the 8-bit ``scheme``'s weight dtype with float32 scales."""
        if not scheme.is_quantized:
            return cls(
                gate_up=torch.zeros(num_slots, 2 * intermediate, hidden, dtype=dtype, device=device),
                down=torch.zeros(num_slots, hidden, intermediate, dtype=dtype, device=device),
            )
        weight = scheme.weight_dtype
        return cls(
            gate_up=torch.zeros(num_slots, 2 * intermediate, hidden, dtype=weight, device=device),
            down=torch.zeros(num_slots, hidden, intermediate, dtype=weight, device=device),
            scheme=scheme,
            gate_up_scale=torch.ones(
                num_slots, *scheme.scale_shape(2 * intermediate, hidden), dtype=torch.float32, device=device
            ),
            down_scale=torch.ones(
                num_slots, *scheme.scale_shape(hidden, intermediate), dtype=torch.float32, device=device
            ),
        )


@dataclass(frozen=True, slots=True)
class _Staging:
    """One pinned host buffer per expert part and the event that marks their last transfer done."""

    parts: tuple[torch.Tensor, ...]  # pinned, as ExpertTensors.parts(): [2I, D], [D, I], scales
    done: torch.cuda.Event

    def fits(self, tensors: ExpertTensors) -> bool:
        return [(t.shape, t.dtype) for t in self.parts] == [(t.shape, t.dtype) for t in tensors.parts()]


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
        parts = bank.parts(slot)
        if not self.is_cuda and store.can_read_into(*parts):
            store.read_into(key, *parts)
            return
        tensors = store.expert(key)
        self.load(bank, slot, tensors)
        del tensors  # the copy is done (CUDA: staged in pinned memory), so the mapped pages can go
        store.release(key)

    def load(self, bank: SlotBank, slot: int, tensors: ExpertTensors) -> None:
        """Copy one expert into ``bank``'s ``slot``. On CUDA the copy is queued: call ``wait`` before
        the compute stream reads the slot."""
        targets, sources = bank.parts(slot), tensors.parts()
        assert len(targets) == len(sources), "slots of the store's scheme"
        if not self.is_cuda:
            for target, source in zip(targets, sources, strict=True):
                target.copy_(source)
            return
        staging = self._staging_buffer(tensors)
        for buffer, source in zip(staging.parts, sources, strict=True):
            buffer.copy_(source)  # page cache -> pinned host memory
        # The slot's previous expert may still be read by kernels queued on the compute stream.
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            # A store dtype other than the slots' is converted on the device, on this stream.
            for target, buffer in zip(targets, staging.parts, strict=True):
                target.copy_(buffer, non_blocking=True)
            staging.done.record(self._stream)
        # The slots belong to the compute stream's allocations: should they be freed while a copy
        # is pending, the allocator must not hand their memory out before the copy is done.
        for whole in bank.stacked():
            whole.record_stream(self._stream)

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
                parts=tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors.parts()),
                done=torch.cuda.Event(),
            )
            for _ in range(self.num_staging)
        ]
        self._next = 0
