"""Which waiting requests run together.

A batch is formed from the oldest waiting request plus every later one that fits beside it: the
union of the pruned selections must fit in the expert slots of every layer, so no sequence of the
batch ever waits on another's experts. While a batch runs, waiting requests that fit beside it join
it (continuous batching), in arrival order; one that does not fit (another task's experts, when the
slots hold one task) is passed over, but at most ``max_overtakes`` times: then joining stops, the
running batch drains and the oldest waiting request leads the next one. A request therefore waits
for a bounded number of others, never indefinitely. This is the ``fifo`` policy; the
``switch-aware`` one (``server/switch_scheduler.py``) serves one task for a quantum before switching.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from retrieval.service import Route
from server.detokenizer import IncrementalDetokenizer
from server.engine_api import GenerationOutput, GenerationRequest


@dataclass
class Sequence:
    """A request inside the engine."""

    request: GenerationRequest
    emit: Callable[[GenerationOutput | BaseException], None]
    detokenizer: IncrementalDetokenizer
    route: Route | None = None
    index: int = 0  # which of the request's samples (``sampling.n``) this is
    generator: torch.Generator | None = None
    matcher: Any = None  # the output constraint's state (server/structured.py Matcher), if any
    prompt_logprobs: list | None = None  # computed at the prefill, sent with the first output
    generated: list[int] = field(default_factory=list)
    overtaken: int = 0  # requests that joined a running batch past this one while it waited
    routing_sent: bool = False
    finished: bool = False
    experts_loaded: int = 0
    experts_reused: int = 0
    arrived: float = field(default_factory=time.monotonic)  # when the engine received it
    switches_waited: int = 0  # switch-aware policy: switches to other tasks while this one waited

    @property
    def request_id(self) -> str:
        return self.request.request_id


class Scheduler:
    def __init__(self, num_slots: int, max_batch_size: int, max_overtakes: int = 16) -> None:
        self.num_slots = num_slots
        self.max_batch_size = max_batch_size
        self.max_overtakes = max_overtakes
        self.waiting: deque[Sequence] = deque()

    def remove(self, request_id: str) -> Sequence | None:
        for sequence in self.waiting:
            if sequence.request_id == request_id:
                self.waiting.remove(sequence)
                return sequence
        return None

    def form_batch(self, running: list[Sequence] | None = None) -> list[Sequence]:
        """The oldest waiting request and the later ones that fit beside it, in arrival order; with a
        batch ``running``, the waiting requests that join it (in arrival order, passing over those
        that do not fit unless one of them has been passed over ``max_overtakes`` times)."""
        running = running or []
        batch: list[Sequence] = []
        passed: list[Sequence] = []  # did not fit into the running batch; later joiners overtake them
        union: dict[int, set[int]] = {}
        for sequence in running:
            self._add_to_union(union, sequence.route)
        for sequence in list(self.waiting):
            if len(running) + len(batch) >= self.max_batch_size:
                break
            if (batch or running) and not self._fits(union, sequence.route):
                if running:
                    if sequence.overtaken >= self.max_overtakes:
                        break  # it has waited long enough: let the running batch drain
                    passed.append(sequence)
                continue
            if any(waiting.overtaken >= self.max_overtakes for waiting in passed):
                break
            for waiting in passed:
                waiting.overtaken += 1
            self._add_to_union(union, sequence.route)
            batch.append(sequence)
            self.waiting.remove(sequence)
        return batch

    def _fits(self, union: dict[int, set[int]], route: Route | None) -> bool:
        if route is None or route.mode != "pruned" or route.selection is None:
            return True
        return all(
            len(union.get(layer, set()) | set(experts)) <= self.num_slots
            for layer, experts in route.selection.items()
        )

    @staticmethod
    def _add_to_union(union: dict[int, set[int]], route: Route | None) -> None:
        if route is not None and route.mode == "pruned" and route.selection is not None:
            for layer, experts in route.selection.items():
                union.setdefault(layer, set()).update(experts)
