"""A deterministic engine for testing the HTTP layer, with no model behind it.

It "generates" the request's ``retrieval_text`` (the last user message, or the prompt) one
character per token, echoed or reversed, then an end-of-sequence token. With ``ignore_eos`` it
repeats the text until ``max_tokens``. It honours ``max_tokens``, stop strings (through the real
``server.detokenizer.IncrementalDetokenizer``: held back while they may be forming, never
returned), aborts and delays, "retrieves" a task by looking for a task
name in the text, and records what it was asked so tests can check it. Tokens are Unicode code
points; ids 0-2 are special.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from expert_store.errors import UnknownTaskError
from retrieval.overview import PatternTable, PatternTables, SuperExpertView
from server.detokenizer import IncrementalDetokenizer
from server.engine_api import (
    EngineNotReadyError,
    GenerationOutput,
    GenerationRequest,
    QueueFullError,
    RoutingInfo,
    SamplingParams,
    TaerOptions,
    Tokenizer,
    TokenLogprob,
)
from server.introspection import RoutePreview, StoredExample
from server.metrics import EngineMetrics

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
FAKE_NUM_EXPERTS = 16


class FakeTokenizer:
    """Characters as tokens, and a small chat template; satisfies ``engine_api.Tokenizer``."""

    bos_token_id = BOS_ID
    eos_token_id = EOS_ID

    def __init__(self, *, has_chat_template: bool = True) -> None:
        self.has_chat_template = has_chat_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([BOS_ID] if add_special_tokens else []) + [ord(char) for char in text]

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in token_ids if not (skip_special_tokens and i <= EOS_ID))

    def __len__(self) -> int:
        return 0xD800  # the code points below the surrogates

    def apply_chat_template(
        self,
        conversation: list[dict[str, str]],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        **_: Any,
    ) -> str | list[int]:
        if not self.has_chat_template:
            raise ValueError("this tokenizer has no chat template")
        text = "".join(f"<|{m['role']}|>{m['content']}\n" for m in conversation)
        text += "<|assistant|>" if add_generation_prompt else ""
        return self.encode(text, add_special_tokens=False) if tokenize else text


@dataclass(slots=True)
class FakeEngineConfig:
    """Knobs for a test. ``max_running`` concurrent generations; one more gets QueueFullError."""

    model_name: str = "fake-moe"
    tasks: tuple[str, ...] = ("arithmetic", "reverse", "sort", "general")
    max_model_len: int = 256
    max_running: int = 4
    script: Literal["echo", "reverse"] = "echo"
    token_delay_s: float = 0.0
    experts_per_pattern: int = 8
    expert_bytes: int = 1024
    num_layers: int = 2


@dataclass(slots=True)
class _Fault:
    error: BaseException
    after_tokens: int


class FakeEngine:
    """Implements ``engine_api.Engine``. Inspect ``requests``, ``aborted`` and ``closed`` in tests;
    set ``ready`` and ``healthy``, or call :meth:`fail_next`, to misbehave on purpose. Any
    tokenizer may replace the built-in one (the script follows the text, not the token ids)."""

    def __init__(
        self,
        config: FakeEngineConfig | None = None,
        *,
        ready: bool = True,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self.config = config or FakeEngineConfig()
        self.ready = ready
        self.healthy = True
        self.started = False
        self.stopped = False
        self.metrics: EngineMetrics | None = None
        self.requests: list[GenerationRequest] = []
        self.aborted: list[str] = []
        self.closed: list[str] = []
        # When an Event, each generation waits for it (or its abort) before its first token: a test
        # holds requests in flight for as long as it needs instead of racing a timer.
        self.gate: asyncio.Event | None = None
        self._tokenizer = tokenizer or FakeTokenizer()
        self._abort_events: dict[str, asyncio.Event] = {}
        self._resident: set[str] = set()
        self._active_task: str | None = None
        self._fault: _Fault | None = None
        self._cache = {"loads": 0, "hits": 0, "misses": 0}

    # Engine protocol ---------------------------------------------------------------------------

    @property
    def is_ready(self) -> bool:
        return self.ready

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def model_name(self) -> str:
        return self.config.model_name

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    async def start(self, metrics: EngineMetrics) -> None:
        self.started, self.metrics = True, metrics

    async def shutdown(self) -> None:
        self.stopped = True
        for event in self._abort_events.values():
            event.set()

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        event = self._abort_events.get(request_id)
        if event is not None:
            event.set()

    async def check_health(self) -> None:
        if not self.healthy:
            raise RuntimeError("the fake engine was told to be unhealthy")

    def task_names(self) -> list[str]:
        return list(self.config.tasks)

    def describe(self) -> dict[str, Any]:
        resident = sorted(self._resident)
        # Only keys the real engine's describe() reports too.
        return {
            "model": self.model_name,
            "tasks": self.task_names(),
            "resident_experts": {
                str(layer): [e for e in range(len(resident) * self.config.experts_per_pattern)]
                for layer in range(self.config.num_layers)
            },
            "cache": dict(self._cache),
        }

    def pattern_tables(self) -> PatternTables:
        """Every task's TCESS a fixed function of (task, layer, expert); its retained experts the
        ``experts_per_pattern`` best of each layer."""
        layers, per = list(range(self.config.num_layers)), self.config.experts_per_pattern
        patterns = []
        for task in self.task_names():
            tcess = [[_fake_tcess(task, layer, e) for e in range(FAKE_NUM_EXPERTS)] for layer in layers]
            retained = [
                sorted(range(FAKE_NUM_EXPERTS), key=lambda e, row=row: -row[e])[:per] for row in tcess
            ]
            patterns.append(PatternTable(task, 100, tcess, retained))
        return PatternTables(
            layers=layers,
            num_experts=FAKE_NUM_EXPERTS,
            top_k=2,
            budget=f"experts_per_layer={per}",
            experts_per_layer=per,
            patterns=patterns,
            super_experts=[SuperExpertView(0, 1, 900.0, 3.0)],
            always_keep={},
        )

    async def preview_route(self, text: str, options: TaerOptions) -> RoutePreview:
        """The route ``generate`` would take (the same task lookup), with nothing activated."""
        if options.task is not None and options.task not in self.config.tasks:
            raise UnknownTaskError(f"unknown task {options.task!r}")
        mode = options.mode or "pruned"
        if mode == "full":
            return RoutePreview(task=None, mode="full", retrieval="full")
        named = [t for t in self.config.tasks if t in text.lower()]
        task = options.task or (named[0] if named else "general")
        similarity = None if options.task else 0.9 if named else 0.3
        retained = next(p.retained for p in self.pattern_tables().patterns if p.task == task)
        experts = dict(enumerate(retained))
        to_load = {} if task in self._resident else experts
        return RoutePreview(
            task=task,
            mode=mode,
            retrieval="forced" if options.task else "semantic",
            similarity=similarity,
            confidence=similarity,
            candidate=None if options.task else task,
            neighbours=() if options.task else (StoredExample(task, f"an example of {task}", 0.9, 0.9),),
            experts=experts,
            experts_to_load=to_load,
            num_experts=sum(map(len, experts.values())),
            num_to_load=sum(map(len, to_load.values())),
        )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        self._admit(request)
        abort_event = self._abort_events[request.request_id] = asyncio.Event()
        try:
            for index in range(request.sampling.n):  # the samples one after the other
                async for output in self._run(request, abort_event):
                    output.index = index
                    yield output
                    if output.finish_reason == "abort":
                        return
        except GeneratorExit:
            self.closed.append(request.request_id)
            raise
        finally:
            del self._abort_events[request.request_id]
            self._report_queue()

    # Test controls ----------------------------------------------------------------------------

    def fail_next(self, error: BaseException, after_tokens: int = 0) -> None:
        """Make the next generation raise ``error`` after yielding ``after_tokens`` tokens."""
        self._fault = _Fault(error, after_tokens)

    @property
    def num_running(self) -> int:
        return len(self._abort_events)

    # Internals --------------------------------------------------------------------------------

    def _admit(self, request: GenerationRequest) -> None:
        if not self.ready:
            raise EngineNotReadyError("the fake engine is loading")
        if self.num_running >= self.config.max_running:
            raise QueueFullError(f"the fake engine runs at most {self.config.max_running} requests")
        if request.taer.task is not None and request.taer.task not in self.config.tasks:
            raise UnknownTaskError(f"unknown task {request.taer.task!r}")
        self.requests.append(request)

    async def _run(
        self, request: GenerationRequest, abort_event: asyncio.Event
    ) -> AsyncIterator[GenerationOutput]:
        fault, self._fault = self._fault, None
        routing = self._route(request)
        script = _script(request.retrieval_text, self.config.script, request.sampling)
        # The script is characters whatever tokenizer the test handed in, so stop strings are
        # matched by the real detokenizer over the characters' own tokenizer.
        stops = IncrementalDetokenizer(FakeTokenizer(), request.sampling.stop)
        limit = min(request.sampling.max_tokens, self.max_model_len - len(request.prompt_token_ids))
        out = _OutputBuilder(request, routing)
        if self.gate is not None:
            await _first_set(self.gate, abort_event)
        if request.sampling.max_tokens == 0:  # scoring the prompt only
            yield out.finish([], "", "length")
            return
        for step, char in enumerate(script):
            if fault is not None and step == fault.after_tokens:
                raise fault.error
            if await _aborted_within(abort_event, self.config.token_delay_s):
                yield out.finish([], "", "abort")
                return
            if char is None:  # end of sequence
                yield out.finish([EOS_ID], stops.flush(), "stop")
                return
            delta = stops.push(ord(char))
            text, matched = delta.text, delta.stop
            if matched is not None:
                yield out.finish([ord(char)], text, "stop", stop_reason=matched)
                return
            if step + 1 >= limit:
                yield out.finish([ord(char)], text + stops.flush(), "length")
                return
            yield out.step([ord(char)], text)
        yield out.finish([], stops.flush(), "length")  # only for an empty script with ignore_eos

    def _route(self, request: GenerationRequest) -> RoutingInfo:
        started = time.monotonic()
        mode = request.taer.mode or "pruned"
        if mode == "full":
            task, similarity = None, None
        elif request.taer.task is not None:
            task, similarity = request.taer.task, None
        else:
            named = [t for t in self.config.tasks if t in request.retrieval_text.lower()]
            task, similarity = (named[0], 0.9) if named else ("general", 0.3)
        loaded = self._activate(task)
        if self.metrics is not None and similarity is not None:
            self.metrics.observe_retrieval(time.monotonic() - started)
        return RoutingInfo(
            task=task,
            mode=mode,
            similarity=similarity,
            confidence=similarity,
            experts_loaded=loaded,
            experts_reused=self.config.experts_per_pattern - loaded if task is not None else 0,
        )

    def _activate(self, task: str | None) -> int:
        if task is None:
            return 0
        per_pattern = self.config.experts_per_pattern
        loaded = 0 if task in self._resident else per_pattern
        self._resident.add(task)
        self._cache["loads"] += loaded
        self._cache["hits" if loaded == 0 else "misses"] += per_pattern
        if self.metrics is not None:
            if task != self._active_task:
                self.metrics.record_pattern_switch(task)
            self.metrics.record_expert_loads(loaded, loaded * self.config.expert_bytes)
            self.metrics.record_expert_lookups(hits=per_pattern - loaded, misses=loaded)
            self.metrics.set_resident_expert_bytes(
                len(self._resident) * per_pattern * self.config.expert_bytes
            )
        self._active_task = task
        return loaded

    def _report_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.set_running(self.num_running)
            self.metrics.set_queue_length(0)


def _fake_tcess(task: str, layer: int, expert: int) -> float:
    return ((sum(map(ord, task)) + 3 * layer + 7 * expert) % FAKE_NUM_EXPERTS) / FAKE_NUM_EXPERTS


def _fake_logprob(token: int, logprob: float, num_top: int) -> TokenLogprob:
    top = tuple((token + offset, logprob - offset) for offset in range(num_top))
    return TokenLogprob(token, logprob, top)


def _script(text: str, kind: str, sampling: SamplingParams) -> list[str | None]:
    """The characters to generate; ``None`` is the end-of-sequence token."""
    chars: list[str | None] = list(text[::-1] if kind == "reverse" else text)
    if not sampling.ignore_eos:
        return [*chars, None]
    return (chars * (sampling.max_tokens // max(len(chars), 1) + 1))[: sampling.max_tokens]


async def _aborted_within(event: asyncio.Event, delay_s: float) -> bool:
    if delay_s <= 0:
        await asyncio.sleep(0)  # still yield to the loop, as a real engine would
        return event.is_set()
    try:
        await asyncio.wait_for(event.wait(), delay_s)
    except asyncio.TimeoutError:
        return False
    return True


async def _first_set(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


class _OutputBuilder:
    """Keeps the running totals of one fake generation."""

    def __init__(self, request: GenerationRequest, routing: RoutingInfo) -> None:
        self._request = request
        self._routing = routing
        self._num_generated = 0

    def step(self, token_ids: list[int], text: str) -> GenerationOutput:
        """Log probabilities, when asked for, are made up: ``-0.25`` for every generated token,
        ``-1.0`` for every prompt token, the alternatives the next token ids."""
        first = self._num_generated == 0
        self._num_generated += len(token_ids)
        sampling, prompt = self._request.sampling, self._request.prompt_token_ids
        return GenerationOutput(
            request_id=self._request.request_id,
            text=text,
            token_ids=token_ids,
            prompt_tokens=len(prompt),
            completion_tokens=self._num_generated,
            routing=self._routing,
            logprobs=None
            if sampling.logprobs is None
            else [_fake_logprob(token, -0.25, sampling.logprobs) for token in token_ids],
            prompt_logprobs=None
            if sampling.prompt_logprobs is None or not first
            else [None, *(_fake_logprob(token, -1.0, sampling.prompt_logprobs) for token in prompt[1:])],
        )

    def finish(
        self,
        token_ids: list[int],
        text: str,
        reason: Literal["stop", "length", "abort"],
        stop_reason: str | None = None,
    ) -> GenerationOutput:
        output = self.step(token_ids, text)
        output.finished, output.finish_reason, output.stop_reason = True, reason, stop_reason
        return output
