"""The engine thread: owns the model, forms batches, steps them, emits tokens.

The model runs on one thread; the async facade (``server/engine.py``) hands requests in through
``submit``/``abort`` and receives outputs through each sequence's ``emit`` callback. Retrieval
(embedding the request, choosing its pattern) runs on a second thread
(``server/retrieval_thread.py``), so a request reaches the engine thread with its route. There a
request's life is visible in ``step``: start a batch (prefetch its experts, prefill) or let waiting
requests join the running one (prefill them, merge their rows), then decode one token for every
live sequence. A request of ``n`` samples is ``n`` sequences sharing one prefill. After a prefill,
the router check (``retrieval/router_check.py``) compares each retrieved pattern with the prompt's
own routing; a request it re-routes leaves the batch before its first token and waits, first in
line, for a prefill with its new pattern. With `taer serve --record`, every prefill's routing is
handed to the recording (``server/recording.py``), and a function another thread needs run between
steps (a pattern reload swapping the router) arrives through the inbox like a request.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from expert_store.errors import RequestError
from expert_store.runtime import MoERuntime
from retrieval.service import PatternRouter
from server.engine_api import GenerationOutput, RoutingInfo, TokenLogprob
from server.logprobs import score_token, score_tokens
from server.model_runner import BatchRunner
from server.retrieval_thread import RetrievalThread
from server.sampling import make_generator, next_token
from server.scheduler import Sequence
from server.switch_scheduler import make_scheduler

if TYPE_CHECKING:
    from collections.abc import Callable

    from server.recording import EngineRecording
    from server.structured import GrammarCompiler, OutputConstraint

logger = logging.getLogger(__name__)


@dataclass
class EngineParts:
    """What the engine serves with, built once at start-up."""

    runtime: MoERuntime
    router: PatternRouter
    tokenizer: object
    model_name: str
    max_model_len: int
    eos_token_ids: frozenset[int]


class EngineCore:
    def __init__(
        self,
        parts: EngineParts,
        metrics,
        max_batch_size: int = 16,
        scheduler: str = "fifo",
        recording: EngineRecording | None = None,
    ) -> None:
        self.parts = parts
        self.metrics = metrics
        self.recording = recording
        metrics.set_expert_capacity(parts.runtime.cache.capacity_bytes, parts.runtime.expert_dtype)
        self.scheduler = make_scheduler(scheduler, parts.runtime.num_slots, max_batch_size)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.batch: list[Sequence] = []
        self.runner: BatchRunner | None = None
        self.stopping = False
        self._last_tasks: frozenset = frozenset()
        self._lock = threading.Lock()
        self.retrieval = RetrievalThread(parts, metrics, deliver=self._arrive, fail=self._fail)
        self._unadded: set[str] = set()  # submitted ids the engine thread has not added yet
        self._cancelled: set[str] = set()  # of those, the ones aborted before they arrived
        self._arrivals = 0  # requests added to the scheduler's queue so far
        self._nothing_joins: tuple | None = None  # what the last join attempt that found none saw
        self._grammars: GrammarCompiler | str | None = None
        self._grammars_lock = threading.Lock()

    # Called from other threads -------------------------------------------------------------------

    def submit(self, group: list[Sequence]) -> None:
        """Hand in one request: its samples, one sequence each, all with the same route or none."""
        # No bound here: the HTTP layer's admission (max_queue) is the one limit on what waits.
        with self._lock:
            self._unadded.add(group[0].request_id)
        if group[0].route is not None:  # routed by the caller (the cluster's ingress): no retrieval here
            self._arrive(group)
        else:
            self.retrieval.put(group)

    def abort(self, request_id: str) -> None:
        self.inbox.put(("abort", request_id))

    def stop(self) -> None:
        self.inbox.put(("stop", None))

    def call_soon(self, function: Callable[[], None]) -> None:
        """Run ``function`` on the engine thread between two steps (no batch is mid-step then)."""
        self.inbox.put(("call", function))

    def _arrive(self, group: list[Sequence]) -> None:
        """Hand a routed request (or one whose routing failed) to the engine thread."""
        self.inbox.put(("add", group))

    # The engine thread ---------------------------------------------------------------------------

    def run_forever(self) -> None:
        self.retrieval.start()
        try:
            self._loop()
        finally:
            self.retrieval.stop()
            self._drain(block=False)  # requests routed meanwhile: they are aborted below
        for sequence in [*self.batch, *self.scheduler.waiting]:
            self._finish(sequence, "abort")

    def _loop(self) -> None:
        while not self.stopping:
            self._drain(block=not self.batch and not self.scheduler.waiting)
            if self.stopping:
                break
            try:
                self.step()
            except Exception as error:  # a fault in one batch fails that batch, not the server
                logger.exception("engine step failed")
                for sequence in self.batch:
                    self._fail(sequence, error)
                self.batch, self.runner = [], None

    def step(self) -> None:
        if not self.batch:
            self._start_batch()
        elif self.runner is not None:
            self._join()
            self.batch = self._decode(self.batch, self.runner)
            if not self.batch:
                self.runner = None
        self.metrics.set_queue_length(len(self.scheduler.waiting))
        self.metrics.set_running(len(self.batch))

    def _drain(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload = item
            if kind == "add":
                self._add(payload)
            elif kind == "abort":
                self._abort(payload)
            elif kind == "call":
                payload()
            else:
                self.stopping = True
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _add(self, group: list[Sequence]) -> None:
        request_id = group[0].request_id
        with self._lock:
            self._unadded.discard(request_id)
        if request_id in self._cancelled:  # aborted while it was being routed
            self._cancelled.discard(request_id)
            for sequence in group:
                self._finish(sequence, "abort")
            return
        if group[0].route is not None:
            self.scheduler.waiting.extend(group)
            self._arrivals += 1

    def _abort(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._unadded:  # still being routed: drop it when it arrives
                self._cancelled.add(request_id)
                return
        while (sequence := self.scheduler.remove(request_id)) is not None:
            self._finish(sequence, "abort")
        for sequence in self.batch:
            if sequence.request_id == request_id and not sequence.finished:
                self._finish(sequence, "abort")
        self._compact()

    def _start_batch(self) -> None:
        batch = self.scheduler.form_batch()
        if not batch:
            return
        self.batch = batch  # from here a failure fails these sequences (run_forever)
        self.runner = self._prepare(batch, running=[])
        self.batch = self._decode(batch, self.runner)  # the prefill and each sequence's first token
        if not self.batch:
            self.runner = None

    def _join(self) -> None:
        """Continuous batching: waiting requests that fit beside the running batch are prefilled on
        their own, then their rows merge into it; from the next step they decode together."""
        if not self.scheduler.waiting or not self.runner.can_join:
            return
        # Whether anything joins depends only on the running rows and the waiting queue: while
        # neither changed, do not test every waiting request against every layer again each token.
        seen = (self._arrivals, len(self.scheduler.waiting), tuple(id(s) for s in self.batch))
        if seen == self._nothing_joins:
            return
        joining = self.scheduler.form_batch(running=self.batch)
        if not joining:
            self._nothing_joins = seen
            return
        try:
            runner = self._prepare(joining, running=self.batch)
            joined = self._decode(joining, runner)
        except Exception as error:  # the joiners fail; the running batch goes on
            logger.exception("prefill of %d joining request(s) failed", len(joining))
            for sequence in joining:
                self._fail(sequence, error)
            return
        if joined:
            self.runner.join(runner)
            self.batch = [*self.batch, *joined]
            self.metrics.record_joined(len(joined))

    def _prepare(self, batch: list[Sequence], running: list[Sequence]) -> BatchRunner:
        """Make ``batch``'s experts resident beside ``running``'s and build its runner (no forward yet)."""
        runtime = self.parts.runtime
        # Prefetch the union with the running rows: the joiners' loads may then evict only experts
        # that no row of the batch is restricted to.
        report = runtime.cache.prefetch(_union([*running, *batch], runtime.num_slots))
        for sequence in batch:  # a re-routed request counts both prefetches
            sequence.experts_loaded += report.loaded
            sequence.experts_reused += report.reused
            sequence.generator = make_generator(sequence.request.sampling, sequence.index)
            constraint = sequence.request.sampling.constraint
            if constraint is not None:
                sequence.matcher = self.grammars.matcher(constraint)
        self.metrics.record_expert_loads(report.loaded, report.bytes_loaded)
        tasks = frozenset(s.route.task for s in [*running, *batch])
        if tasks != self._last_tasks:
            for task in tasks - self._last_tasks:
                self.metrics.record_pattern_switch(task or "full")
            self._last_tasks = tasks
        # A request's samples share one prefill: one prompt row for each request.
        firsts: dict[str, int] = {}
        expand = [firsts.setdefault(s.request_id, len(firsts)) for s in batch]
        prompted = [batch[expand.index(row)] for row in range(len(firsts))]
        runner = BatchRunner(
            runtime,
            [s.request.prompt_token_ids for s in prompted],
            _row_masks(prompted, runtime),
            expand=expand,
            score_prompts=[
                row for row, s in enumerate(prompted) if s.request.sampling.prompt_logprobs is not None
            ],
            check_prompts=[row for row, s in enumerate(prompted) if self.parts.router.checks(s.route)],
        )
        if self.recording is not None:  # its prefill's routing, per prompt
            self.recording.watch(runner, prompted)
        return runner

    def check_constraint(self, constraint: OutputConstraint) -> None:
        """Compile ``constraint`` now (any thread): RequestError if it cannot be used."""
        grammars = self.grammars
        if isinstance(grammars, str):
            raise RequestError(grammars, param=constraint.param)
        grammars.check(constraint)

    @property
    def grammars(self) -> GrammarCompiler | str:
        """Output constraints compiled for this model's tokenizer. Made once, on first use (seconds
        for a large vocabulary), under a lock; a tokenizer the grammar engine cannot read is
        remembered as the reason (a string), which :meth:`check_constraint` answers every request
        asking for a constraint with (a 400)."""
        with self._grammars_lock:
            if self._grammars is None:
                from server.structured import GrammarCompiler  # the grammar engine loads on first use

                vocab_size = self.parts.runtime.model.get_output_embeddings().weight.shape[0]
                try:
                    self._grammars = GrammarCompiler(
                        self.parts.tokenizer, vocab_size, eos_token_ids=sorted(self.parts.eos_token_ids)
                    )
                except (ValueError, TypeError) as error:
                    self._grammars = (
                        f"structured outputs are not available for this model's tokenizer ({error})"
                    )
        return self._grammars

    def _decode(self, batch: list[Sequence], runner: BatchRunner) -> list[Sequence]:
        """One forward of ``runner`` and one sampled token per row. Returns the live sequences; the
        finished rows are dropped from the runner and the live rows' tokens queued in it."""
        before = self.parts.runtime.cache.stats.copy()
        logits = runner.step()  # [B, V]
        delta = self.parts.runtime.cache.stats - before
        self.metrics.record_expert_lookups(delta.hits, delta.misses)
        if delta.loads:
            self.metrics.record_expert_loads(delta.loads, delta.bytes_loaded)
        self.metrics.set_resident_expert_bytes(self.parts.runtime.cache.resident_bytes)
        rerouted = self._check_routes(batch, runner) if runner.router_choices else set()
        if self.recording is not None:
            self.recording.record(batch, runner, rerouted)
        if runner.prompt_hidden:
            _score_prompts(batch, runner)
        tokens = []
        for row, sequence in enumerate(batch):
            sampling = sequence.request.sampling
            if row in rerouted:  # no token: it waits for a prefill with its new pattern
                tokens.append(0)
                continue
            if sampling.max_tokens == 0:  # scoring the prompt only
                tokens.append(0)
                if not sequence.finished:
                    self._emit(sequence, "", [], "length", None)
                continue
            try:
                token = self._sample(sequence, logits[row])
            except RequestError as error:  # the output constraint cannot go on: this sequence fails
                logger.warning("request %s: %s", sequence.request_id, error)
                self._fail(sequence, error)
                token = 0
            tokens.append(token)
            if not sequence.finished:
                logprob = None
                if sampling.logprobs is not None:
                    logprob = score_token(logits[row], token, sampling.logprobs)
                self._push(sequence, token, logprob)
        live = [row for row, sequence in enumerate(batch) if not sequence.finished and row not in rerouted]
        if live:
            runner.keep(live)
            runner.append([tokens[row] for row in live])
        return [batch[row] for row in live]

    def _check_routes(self, batch: list[Sequence], runner: BatchRunner) -> set[int]:
        """The router check on the prompts just prefilled: each checked sequence's route follows the
        verdict; the rows re-routed (to another task or to exact mode) go back to the front of the
        queue. Returns those rows."""
        router, verdicts, rerouted = self.parts.router, {}, set()
        choices, runner.router_choices = runner.router_choices, {}  # the prefill's, looked at once
        for row, (sequence, prompt) in enumerate(zip(batch, runner.prompt_rows, strict=True)):
            if prompt not in choices or sequence.finished:
                continue
            if prompt not in verdicts:  # once for the samples of one request
                verdicts[prompt] = router.check.decide(sequence.route.task, choices[prompt])
                self.metrics.record_router_check(verdicts[prompt].action)
            sequence.route = router.follow(sequence.route, verdicts[prompt])
            if verdicts[prompt].action != "kept":
                rerouted.add(row)
        if rerouted:
            self.scheduler.waiting.extendleft(reversed([batch[row] for row in sorted(rerouted)]))
            self._arrivals += 1
        return rerouted

    @staticmethod
    def _sample(sequence: Sequence, logits: torch.Tensor) -> int:
        """The next token from one row's logits [V], within the output constraint if there is one.
        A constraint this model's vocabulary cannot follow is the request's error (400)."""
        sampling = sequence.request.sampling
        if sequence.matcher is None:
            return next_token(logits, sampling, sequence.generated, sequence.generator)
        logits = logits.clone()
        try:
            sequence.matcher.mask_logits(logits)  # RuntimeError if it allows no token
            token = next_token(logits, sampling, sequence.generated, sequence.generator)
            sequence.matcher.accept(token)
        except RuntimeError as error:
            raise RequestError(
                "the output constraint cannot be followed with this model's vocabulary: "
                + str(error).splitlines()[0][:300],
                param=sampling.constraint.param,
            ) from None
        return token

    def _push(self, sequence: Sequence, token: int, logprob: TokenLogprob | None) -> None:
        sampling = sequence.request.sampling
        sequence.generated.append(token)
        is_eos = token in self.parts.eos_token_ids and (
            not sampling.ignore_eos or sequence.matcher is not None
        )
        delta = sequence.detokenizer.push(token)
        text, reason, stop = delta.text, None, delta.stop
        if stop is not None or is_eos or (sequence.matcher is not None and sequence.matcher.is_done):
            reason = "stop"
        elif len(sequence.generated) >= sampling.max_tokens or (
            len(sequence.request.prompt_token_ids) + len(sequence.generated) >= self.parts.max_model_len
        ):
            reason = "length"
        if reason is not None and stop is None:
            text += sequence.detokenizer.flush()
        self._emit(sequence, text, [token], reason, stop, None if logprob is None else [logprob])

    def _compact(self) -> None:
        """Drop finished (aborted) rows from the running batch."""
        live = [row for row, sequence in enumerate(self.batch) if not sequence.finished]
        if not live:
            self.batch, self.runner = [], None
            return
        if self.runner is not None:
            self.runner.keep(live)
        self.batch = [self.batch[row] for row in live]

    def _emit(
        self,
        sequence: Sequence,
        text: str,
        token_ids: list[int],
        reason,
        stop: str | None,
        logprobs: list[TokenLogprob] | None = None,
    ) -> None:
        routing, prompt_logprobs = None, None
        if not sequence.routing_sent:
            prompt_logprobs, sequence.prompt_logprobs = sequence.prompt_logprobs, None
            route = sequence.route
            check = route.check if route else None
            routing = RoutingInfo(
                task=route.task if route else None,
                mode=route.mode if route else "full",
                similarity=route.similarity if route else None,
                confidence=route.confidence if route else None,
                experts_loaded=sequence.experts_loaded,
                experts_reused=sequence.experts_reused,
                retrieved_task=check.retrieved if check else None,
                checked_task=check.checked if check else None,
                rerouted=check.action != "kept" if check else None,
                coverage=check.served_coverage if check else None,
            )
            sequence.routing_sent = True
        if reason is not None:
            sequence.finished = True
        sequence.emit(
            GenerationOutput(
                request_id=sequence.request_id,
                text=text,
                token_ids=token_ids,
                finished=reason is not None,
                finish_reason=reason,
                stop_reason=stop,
                prompt_tokens=len(sequence.request.prompt_token_ids),
                completion_tokens=len(sequence.generated),
                routing=routing,
                index=sequence.index,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
            )
        )

    def _finish(self, sequence: Sequence, reason: str) -> None:
        if not sequence.finished:
            self._emit(sequence, "", [], reason, None)

    def _fail(self, sequence: Sequence, error: BaseException) -> None:
        if not sequence.finished:
            sequence.finished = True
            sequence.emit(error)


def _score_prompts(batch: list[Sequence], runner: BatchRunner) -> None:
    """Each sequence that asked for them gets its prompt's log probabilities (computed once for the
    samples of one request), from the prefill, one prompt at a time."""
    scored: dict[int, list] = {}
    for sequence, row in zip(batch, runner.prompt_rows, strict=True):
        num_top = sequence.request.sampling.prompt_logprobs
        if num_top is None:
            continue
        if row not in scored:
            logits = runner.prompt_logits(row)  # [S, V]
            prompt = sequence.request.prompt_token_ids
            start = logits.shape[0] - len(prompt)  # left padding
            scored[row] = [None, *score_tokens(logits[start:-1], prompt[1:], num_top)]
        sequence.prompt_logprobs = scored[row]


def _union(batch: list[Sequence], num_slots: int) -> dict[int, list[int]]:
    """Experts to prefetch: pruned selections first (they must be resident), then exact hints."""
    union: dict[int, list[int]] = {}
    ordered = sorted(batch, key=lambda s: s.route.mode != "pruned")
    for sequence in ordered:
        for layer, experts in (sequence.route.selection or {}).items():
            merged = union.setdefault(layer, [])
            merged.extend(e for e in experts if e not in merged and len(merged) < num_slots)
    return union


def _row_masks(batch: list[Sequence], runtime: MoERuntime) -> dict[int, torch.Tensor]:
    """layer -> bool [B, E]: a pruned sequence's row allows its selection, any other row all experts."""
    layout = runtime.layout
    masks = {}
    for layer in layout.moe_layers:
        rows = torch.ones(len(batch), layout.num_experts, dtype=torch.bool)
        for row, sequence in enumerate(batch):
            if sequence.route.mode == "pruned" and sequence.route.selection is not None:
                rows[row] = False
                rows[row, list(sequence.route.selection[layer])] = True
        masks[layer] = rows.to(runtime.device)
    return masks
