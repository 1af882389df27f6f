"""`taer serve --record DIR`: the engine's side of recording what it served.

The engine calls :meth:`EngineRecording.watch` when it builds a batch's runner (before its prefill)
and :meth:`EngineRecording.record` after each forward; after the watched prefill, each of its
requests that keeps its route (one the router check re-routes is recorded at its next prefill)
becomes one :class:`PendingRecord` for the :class:`~server.record_files.RecordWriter`, whose thread
turns it into a line (:mod:`retrieval.routing_record` says what a record holds, and why). The engine
thread only slices tensors and queues; it never waits on the files.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from retrieval.patterns import PatternSet
from retrieval.routing_record import RoutingRecord, sha256_text
from retrieval.service import Route
from retrieval.tasks_file import GENERAL
from server.record_files import RecordOptions, RecordWriter
from server.routing_tap import RoutingTap

if TYPE_CHECKING:
    from server.engine_core import EngineParts
    from server.model_runner import BatchRunner
    from server.scheduler import Sequence as EngineSequence


@dataclass(frozen=True, eq=False)
class PendingRecord:
    """A request's routing as the engine thread hands it over; the writer thread makes the line."""

    unix_time: float
    request_id: str
    prompt_token_ids: list[int]
    retrieval_text: str
    route: Route | None
    num_tokens: int
    counts: Tensor  # [L, E]
    tcess_sums: Tensor  # [L, E]
    patterns: str
    decode: Callable[[list[int]], str]
    with_text: bool

    def to_line(self) -> bytes:
        prompt = self.decode(self.prompt_token_ids)
        route = self.route
        record = RoutingRecord(
            time=datetime.fromtimestamp(self.unix_time, timezone.utc),
            request_id=self.request_id,
            task=route.task if route else None,
            mode=route.mode if route else "full",
            num_tokens=self.num_tokens,
            counts=self.counts,
            tcess_sums=self.tcess_sums,
            prompt_sha256=sha256_text(prompt),
            retrieval_sha256=sha256_text(self.retrieval_text),
            similarity=route.similarity if route else None,
            confidence=route.confidence if route else None,
            patterns=self.patterns,
            prompt=prompt if self.with_text else None,
            retrieval_text=self.retrieval_text if self.with_text else None,
        )
        return record.to_line()


class EngineRecording:
    """The engine's recording hook (see the module docstring); ``metrics`` counts what is written
    and dropped."""

    def __init__(self, parts: EngineParts, options: RecordOptions, metrics) -> None:
        self.parts = parts
        self.options = options
        self.writer = RecordWriter(options, metrics.record_written, metrics.record_dropped)
        self.tap = RoutingTap(parts.runtime)
        self._runner: BatchRunner | None = None
        self._prompted: list[EngineSequence] = []
        self._patterns = ""

    def start(self) -> None:
        self.writer.start()

    def close(self) -> None:
        self.tap.disarm()
        self.writer.close()

    def watch(self, runner: BatchRunner, prompted: Sequence[EngineSequence]) -> None:
        """Tap ``runner``'s prefill; ``prompted``: the sequence of each of its prompt rows."""
        patterns = self.parts.router.patterns
        thresholds = torch.stack([_thresholds(patterns, s.route) for s in prompted])  # [P, L]
        general = patterns.general.stats
        self.tap.arm(runner.attention_mask, thresholds, self.tap.score_rule(general.ka, general.top_k))
        self._runner, self._prompted, self._patterns = runner, list(prompted), patterns.created

    def record(self, batch: Sequence[EngineSequence], runner: BatchRunner, rerouted: set[int]) -> None:
        """After a forward of ``runner`` over ``batch``: if it was the watched prefill, queue one
        record per request not in the ``rerouted`` rows."""
        if runner is not self._runner:
            if self._runner is not None:  # the watched prefill failed: its hooks must not stay on
                self.tap.disarm()
                self._runner, self._prompted = None, []
            return
        self._runner = None
        routing = self.tap.collect()
        if routing is None:
            return
        skipped = {batch[row].request_id for row in rerouted}
        now = time.time()
        for prompt, sequence in enumerate(self._prompted):
            if sequence.request_id in skipped:
                continue
            request = sequence.request
            self.writer.put(
                PendingRecord(
                    unix_time=now,
                    request_id=sequence.request_id,
                    prompt_token_ids=request.prompt_token_ids,
                    retrieval_text=request.retrieval_text,
                    route=sequence.route,
                    num_tokens=routing.num_tokens[prompt],
                    counts=routing.counts[prompt],
                    tcess_sums=routing.tcess_sums[prompt],
                    patterns=self._patterns,
                    decode=self.parts.tokenizer.decode,
                    with_text=self.options.with_text,
                )
            )
        self._prompted = []


def _thresholds(patterns: PatternSet, route: Route | None) -> Tensor:
    """r_l of the pattern serving ``route`` ([L]): its task's, or ``general``'s (the full model, or a
    task these patterns lack)."""
    task = route.task if route is not None and route.task in patterns else GENERAL
    return patterns.get(task).stats.thresholds
