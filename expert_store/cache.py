"""Which expert sits in which slot, and the policy that fills slots.

Activating a selection loads only the experts not yet resident, evicting the least recently used
experts the selection does not need; selections that share experts share slots. In exact mode a
step's chosen experts that are not resident are loaded on demand, evicting the least recently used
experts the step does not need; a step needing more distinct experts than there are slots is
processed in waves.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields

import torch

from expert_store.errors import SelectionError
from expert_store.keys import ExpertKey
from expert_store.loader import ExpertLoader, SlotBank
from expert_store.modes import ROUTING_MODES, RoutingMode
from expert_store.store import ExpertStore


@dataclass(slots=True)
class CacheStats:
    """Counters since the cache was built. Hits and misses count (step, layer, expert) uses."""

    loads: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_loaded: int = 0
    load_seconds: float = 0.0
    activations: int = 0

    def copy(self) -> CacheStats:
        return CacheStats(**{f.name: getattr(self, f.name) for f in fields(self)})

    def __sub__(self, other: CacheStats) -> CacheStats:
        return CacheStats(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 1.0


@dataclass(frozen=True, slots=True)
class ActivationReport:
    """What one activation did."""

    mode: str
    loaded: int
    reused: int
    evicted: int
    bytes_loaded: int
    seconds: float


class LayerSlots:
    """Slot bookkeeping for one layer: expert -> slot, free slots, recency order."""

    def __init__(self, num_slots: int) -> None:
        self.slot_of: dict[int, int] = {}
        self.free = list(range(num_slots - 1, -1, -1))
        self.recency: OrderedDict[int, None] = OrderedDict()  # least recently used first

    def is_resident(self, expert: int) -> bool:
        return expert in self.slot_of

    def touch(self, expert: int) -> None:
        self.recency.move_to_end(expert)

    def victims(self, count: int, protected: set[int], kept: frozenset[int] = frozenset()) -> list[int]:
        """``count`` experts to evict, never ``protected`` ones: least recently used first, the
        ``kept`` ones (the active pattern) only when nothing else is left."""
        candidates = [expert for expert in self.recency if expert not in protected]
        chosen = [e for e in candidates if e not in kept] + [e for e in candidates if e in kept]
        chosen = chosen[:count]
        assert len(chosen) == count, "caller must never need more slots than exist"
        return chosen

    def evict(self, expert: int) -> None:
        self.free.append(self.slot_of.pop(expert))
        del self.recency[expert]

    def assign(self, expert: int) -> int:
        slot = self.free.pop()
        self.slot_of[expert] = slot
        self.recency[expert] = None
        return slot


class ExpertCache:
    """Slots of every MoE layer, filled from the store."""

    def __init__(
        self, store: ExpertStore, banks: Mapping[int, SlotBank], loader: ExpertLoader, device: torch.device
    ) -> None:
        self.store = store
        self.banks = dict(banks)
        self.loader = loader
        self.layout = store.layout
        self.slots = {layer: LayerSlots(bank.num_slots) for layer, bank in self.banks.items()}
        self.num_slots = next(iter(self.banks.values())).num_slots
        self.mode: RoutingMode = "exact"
        self.stats = CacheStats()
        self._allowed: dict[int, torch.Tensor] = {}
        self._row_masks: dict[int, torch.Tensor] | None = None
        self._pattern: dict[int, frozenset[int]] = {}  # the last activated or prefetched experts
        self._device = device

    # Activation ------------------------------------------------------------------------------------

    def activate(
        self, selection: Mapping[int, Sequence[int]], mode: RoutingMode = "pruned"
    ) -> ActivationReport:
        """Make ``selection`` (layer -> expert ids, in priority order) resident and set the mode.

        Pruned: routing is restricted to the selection, which must hold between top-k and the slot
        count of experts in every MoE layer. Exact: the selection is a prefetch hint (the first
        ``slots`` experts of each layer are loaded); routing is the model's own.
        """
        if mode not in ROUTING_MODES:
            raise SelectionError(f"unknown mode {mode!r}; use one of {', '.join(ROUTING_MODES)}")
        wanted = {
            layer: self._checked(layer, selection.get(layer, ()), mode) for layer in self.layout.moe_layers
        }
        report = self._load(wanted, mode)
        self.mode = mode
        self._allowed = (
            {layer: self.mask(experts) for layer, experts in wanted.items()} if mode == "pruned" else {}
        )
        self._row_masks = None
        return report

    def prefetch(self, selection: Mapping[int, Sequence[int]]) -> ActivationReport:
        """Load ``selection`` (truncated to the slots, in priority order) without touching routing."""
        wanted = {
            layer: self._checked(layer, selection.get(layer, ()), "exact") for layer in self.layout.moe_layers
        }
        return self._load(wanted, "prefetch")

    def set_row_masks(self, masks: Mapping[int, torch.Tensor] | None) -> None:
        """Per-sequence routing restrictions for the next forwards: layer -> bool [B, E], one row per
        sequence of the batch (a row of all True is the model's own routing). None clears them."""
        self._row_masks = dict(masks) if masks is not None else None
        self._allowed = {}

    def _load(self, wanted: Mapping[int, list[int]], label: str) -> ActivationReport:
        # What was asked for is the pattern: on-demand loads evict other experts before its own.
        self._pattern = {layer: frozenset(experts) for layer, experts in wanted.items()}
        before, start = self.stats.copy(), time.perf_counter()
        reused = 0
        for layer, experts in wanted.items():
            reused += sum(self.slots[layer].is_resident(e) for e in experts)
            self._ensure(layer, experts)
        self.loader.wait()
        self.stats.activations += 1
        delta = self.stats - before
        return ActivationReport(
            label, delta.loads, reused, delta.evictions, delta.bytes_loaded, time.perf_counter() - start
        )

    def _checked(self, layer: int, experts: Sequence[int], mode: RoutingMode) -> list[int]:
        experts = list(dict.fromkeys(int(e) for e in experts))
        bad = [e for e in experts if not 0 <= e < self.layout.num_experts]
        if bad:
            raise SelectionError(f"layer {layer}: expert ids {bad} outside 0..{self.layout.num_experts - 1}")
        if mode == "exact":
            return experts[: self.num_slots]
        if len(experts) < self.layout.top_k:
            raise SelectionError(
                f"layer {layer}: pruned mode needs at least top-k = {self.layout.top_k} experts, got {len(experts)}"
            )
        if len(experts) > self.num_slots:
            raise SelectionError(
                f"layer {layer}: {len(experts)} experts selected but only {self.num_slots} slots per layer; "
                "lower the budget or give the runtime more slots"
            )
        return experts

    def mask(self, experts: Sequence[int]) -> torch.Tensor:
        """A bool [E] mask on the device with ``experts`` set."""
        mask = torch.zeros(self.layout.num_experts, dtype=torch.bool)
        mask[list(experts)] = True
        return mask.to(self._device)

    def allowed(self, layer: int) -> torch.Tensor | None:
        """The router's bool mask for this layer: [E] in pruned mode, [B, E] with row masks, else None."""
        if self._row_masks is not None:
            return self._row_masks.get(layer)
        return self._allowed.get(layer)

    # Per step ---------------------------------------------------------------------------------------

    def waves(self, layer: int, needed: list[int]) -> Iterator[list[tuple[int, int]]]:
        """(expert, slot) pairs covering ``needed`` (sorted expert ids), loading what is missing.

        Yields one list when everything fits in the slots, several (waves) when it does not. The
        experts of a yielded list stay resident until the caller asks for the next one.
        """
        slots = self.slots[layer]
        hits = [e for e in needed if slots.is_resident(e)]
        self.stats.hits += len(hits)
        self.stats.misses += len(needed) - len(hits)
        if len(needed) <= self.num_slots:
            self._ensure(layer, needed)
            self.loader.wait()
            yield [(e, slots.slot_of[e]) for e in needed]
            return
        for e in hits:
            slots.touch(e)
        yield [(e, slots.slot_of[e]) for e in hits]
        resident = set(hits)
        missing = [e for e in needed if e not in resident]
        for start in range(0, len(missing), self.num_slots):
            wave = missing[start : start + self.num_slots]
            self._ensure(layer, wave)
            self.loader.wait()
            yield [(e, slots.slot_of[e]) for e in wave]

    def _ensure(self, layer: int, experts: list[int]) -> None:
        """Load the experts of ``experts`` not resident, evicting LRU experts outside it."""
        slots, bank = self.slots[layer], self.banks[layer]
        missing = [e for e in experts if not slots.is_resident(e)]
        shortfall = len(missing) - len(slots.free)
        if shortfall > 0:
            for victim in slots.victims(
                shortfall, protected=set(experts), kept=self._pattern.get(layer, frozenset())
            ):
                slots.evict(victim)
                self.stats.evictions += 1
        start = time.perf_counter()
        with self.loader.session():
            for expert in missing:
                slot = slots.assign(expert)
                try:
                    self.loader.load_from(self.store, ExpertKey(layer, expert), bank, slot)
                except BaseException:
                    slots.evict(expert)  # a slot never claims an expert it does not hold
                    raise
                self.stats.loads += 1
                self.stats.bytes_loaded += bank.nbytes_per_slot
        self.stats.load_seconds += time.perf_counter() - start
        for expert in experts:
            slots.touch(expert)

    # Introspection ----------------------------------------------------------------------------------

    def resident(self) -> dict[int, list[int]]:
        return {layer: sorted(slots.slot_of) for layer, slots in self.slots.items()}

    @property
    def resident_bytes(self) -> int:
        return sum(len(s.slot_of) * self.banks[layer].nbytes_per_slot for layer, s in self.slots.items())

    @property
    def capacity_bytes(self) -> int:
        return sum(bank.num_slots * bank.nbytes_per_slot for bank in self.banks.values())
