"""Continuous batching: requests join a running batch, each row still computes what it would alone,
and joining never lets a request overtake an older one."""

from __future__ import annotations

import asyncio

import pytest
import torch
from engine_helpers import greedy_request, started_engine
from pipeline import build_pipeline

from expert_store.runtime import RuntimeConfig, load_runtime
from retrieval.service import Route
from server.engine_api import GenerationRequest, SamplingParams
from server.loading import ServeConfig
from server.metrics import Metrics
from server.model_runner import BatchRunner
from server.scheduler import Scheduler, Sequence


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return build_pipeline(tmp_path_factory.mktemp("continuous"))


@pytest.fixture(scope="module")
def runtime(pipeline):
    store, _ = pipeline
    runtime = load_runtime(store, RuntimeConfig())
    yield runtime
    runtime.close()


def _masks(runtime, rows: list[list[int] | None]) -> dict[int, torch.Tensor]:
    """layer -> bool [B, E]: a list restricts that row to those experts, None allows all."""
    layout = runtime.layout
    masks = {}
    for layer in layout.moe_layers:
        mask = torch.ones(len(rows), layout.num_experts, dtype=torch.bool)
        for row, allowed in enumerate(rows):
            if allowed is not None:
                mask[row] = False
                mask[row, allowed] = True
        masks[layer] = mask
    return masks


def _greedy(runner: BatchRunner, steps: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    """``steps`` greedy tokens for every row: (tokens per row, logits per step [B, V])."""
    tokens: list[list[int]] = [[] for _ in range(runner.num_rows)]
    logits = []
    for _ in range(steps):
        step_logits = runner.step()  # [B, V]
        logits.append(step_logits.clone())
        picked = step_logits.argmax(dim=-1).tolist()
        for row, token in enumerate(picked):
            tokens[row].append(token)
        runner.append(picked)
    return tokens, logits


PROMPTS = [
    [5, 9, 12, 7, 30, 31, 8, 5, 40, 41, 42],  # the longest: the joiners are padded to it
    [6, 7, 8],
    [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35],  # longer than the running batch
]
RESTRICTED = [None, [0, 1, 2, 3], [2, 3, 4, 5]]


@pytest.mark.parametrize("joiner", [1, 2])
def test_a_joined_row_computes_what_it_would_alone(runtime, joiner):
    expected = {}
    for row in (0, joiner):
        alone = BatchRunner(runtime, [PROMPTS[row]], _masks(runtime, [RESTRICTED[row]]))
        expected[row] = _greedy(alone, 8)
    running = BatchRunner(runtime, [PROMPTS[0]], _masks(runtime, [RESTRICTED[0]]))
    first_tokens, first_logits = _greedy(running, 3)
    joining = BatchRunner(runtime, [PROMPTS[joiner]], _masks(runtime, [RESTRICTED[joiner]]))
    join_tokens, join_logits = _greedy(joining, 1)  # the prefill and its first token
    assert running.can_join and joining.can_join
    running.join(joining)
    assert running.num_rows == 2
    rest_tokens, rest_logits = _greedy(running, 5)
    assert first_tokens[0] + rest_tokens[0] == expected[0][0][0][:8]
    assert join_tokens[0] + rest_tokens[1] == expected[joiner][0][0][:6]
    for step, logits in enumerate(rest_logits):
        torch.testing.assert_close(logits[0], expected[0][1][3 + step][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(logits[1], expected[joiner][1][1 + step][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(join_logits[0][0], expected[joiner][1][0][0], atol=1e-5, rtol=0)
    for step, logits in enumerate(first_logits):  # before the join: the batch of one is the run alone
        torch.testing.assert_close(logits[0], expected[0][1][step][0], atol=1e-5, rtol=0)


def test_rows_leave_and_join_repeatedly(runtime):
    """Drop a finished row, join another, drop again: the survivors never notice."""
    alone = {
        row: _greedy(BatchRunner(runtime, [PROMPTS[row]], _masks(runtime, [None])), 7)[0][0]
        for row in (0, 1, 2)
    }
    running = BatchRunner(runtime, PROMPTS[:2], _masks(runtime, [None, None]))
    tokens, _ = _greedy(running, 2)
    running.keep([0])  # row 1 finished
    joining = BatchRunner(runtime, [PROMPTS[2]], _masks(runtime, [None]))
    joined, _ = _greedy(joining, 1)
    running.join(joining)
    more, _ = _greedy(running, 4)
    assert tokens[0] + more[0] == alone[0][:6]
    assert joined[0] + more[1] == alone[2][:5]


def _sequence(name: str, selection: dict[int, list[int]] | None) -> Sequence:
    route = Route(task=name, mode="pruned", selection=selection)
    request = GenerationRequest(name, [1, 2], name, SamplingParams(max_tokens=2))
    return Sequence(request=request, emit=lambda _: None, detokenizer=None, route=route)


def test_joiners_pass_a_request_that_does_not_fit_a_bounded_number_of_times():
    scheduler = Scheduler(num_slots=4, max_batch_size=8, max_overtakes=2)
    running = [_sequence("run", {0: [0, 1]})]
    big = _sequence("big", {0: [4, 5, 6]})  # with the running batch's 2: 5 experts > 4 slots
    scheduler.waiting.extend([_sequence("fits", {0: [0, 3]}), big, _sequence("small", {0: [1, 2]})])
    assert [s.request_id for s in scheduler.form_batch(running=running)] == ["fits", "small"]
    assert big.overtaken == 1  # `small` went past it
    scheduler.waiting.extend([_sequence("s2", {0: [1]}), _sequence("s3", {0: [0]})])
    assert [s.request_id for s in scheduler.form_batch(running=running)] == ["s2"]
    assert big.overtaken == 2  # the limit: nobody joins past it any more
    assert scheduler.form_batch(running=running) == []
    assert [s.request_id for s in scheduler.waiting] == ["big", "s3"]
    # The running batch drains; the oldest leads the next batch and later ones fill it.
    assert [s.request_id for s in scheduler.form_batch()] == ["big", "s3"]


def test_with_no_overtakes_joining_stops_at_the_first_request_that_does_not_fit():
    scheduler = Scheduler(num_slots=4, max_batch_size=8, max_overtakes=0)
    running = [_sequence("run", {0: [0, 1]})]
    scheduler.waiting.extend([_sequence("big", {0: [4, 5, 6]}), _sequence("small", {0: [1, 2]})])
    assert scheduler.form_batch(running=running) == []


def test_joining_respects_the_batch_size():
    scheduler = Scheduler(num_slots=8, max_batch_size=3)
    running = [_sequence("a", {0: [0]}), _sequence("b", {0: [1]})]
    scheduler.waiting.extend([_sequence("c", {0: [2]}), _sequence("d", {0: [3]})])
    assert [s.request_id for s in scheduler.form_batch(running=running)] == ["c"]


@pytest.mark.anyio
async def test_a_request_joins_a_running_one_and_both_answer_as_alone(pipeline):
    store, patterns = pipeline
    metrics = Metrics()
    config = ServeConfig(store, patterns, keep=0.5, slots_per_layer=8)
    engine = await started_engine(config, metrics, max_batch_size=4)

    def request(name: str, text: str, max_tokens: int) -> GenerationRequest:
        return greedy_request(engine.tokenizer, name, text, max_tokens)

    async def tokens(stream) -> list[int]:
        return [t async for output in stream for t in output.token_ids]

    # The long request is 60x the short one, so a loaded machine cannot finish it before the short
    # one (prefill and 5 tokens) has joined and finished.
    long_text, short_text = "Reverse the letters of the word zebra.", "What is 3 plus 10?"
    long_tokens, short_tokens = 300, 5
    try:
        long_alone = await tokens(engine.generate(request("la", long_text, long_tokens)))
        short_alone = await tokens(engine.generate(request("sa", short_text, short_tokens)))
        events: list[str] = []
        long_is_decoding = asyncio.Event()

        async def run(name: str, text: str, max_tokens: int) -> list[int]:
            out = []
            async for output in engine.generate(request(name, text, max_tokens)):
                out += output.token_ids
                long_is_decoding.set()
                if output.finished:
                    events.append(name)
            return out

        long_task = asyncio.create_task(run("long", long_text, long_tokens))
        await asyncio.wait_for(long_is_decoding.wait(), 60)  # its first token is out
        short = await run("short", short_text, short_tokens)
        long = await long_task
    finally:
        await engine.shutdown()
    assert events == ["short", "long"]  # the short request joined; it did not wait for the long one
    assert short == short_alone and long == long_alone
    assert "taer_requests_joined_total 1.0" in metrics.render().decode()


@pytest.mark.anyio
async def test_aborting_a_joined_or_a_running_request_leaves_the_other_as_alone(pipeline):
    store, patterns = pipeline
    config = ServeConfig(store, patterns, keep=0.5, slots_per_layer=8)
    engine = await started_engine(config, max_batch_size=4)

    def request(name: str, text: str) -> GenerationRequest:
        return greedy_request(engine.tokenizer, name, text, 24)

    first, second = "Reverse the letters of the word zebra.", "What is 3 plus 10?"
    try:
        alone = {}
        for name, text in (("a", first), ("b", second)):
            alone[name] = [t async for o in engine.generate(request(name, text)) for t in o.token_ids]
        for victim in ("b2", "a2"):  # abort the joined request, then the one it joined
            streams = {"a2": engine.generate(request("a2", first))}
            head = {"a2": (await streams["a2"].__anext__()).token_ids}  # a2 is decoding
            streams["b2"] = engine.generate(request("b2", second))
            head["b2"] = (await streams["b2"].__anext__()).token_ids  # b2 has joined
            await engine.abort(victim)
            outputs = {}
            for name, stream in streams.items():
                outputs[name] = [o async for o in stream]
            assert outputs[victim][-1].finish_reason == "abort"
            survivor = "a2" if victim == "b2" else "b2"
            tokens = head[survivor] + [t for o in outputs[survivor] for t in o.token_ids]
            assert tokens == alone[survivor[0]] and outputs[survivor][-1].finish_reason == "length"
    finally:
        await engine.shutdown()
