"""The switch-aware policy on sequences with fake routes: a task keeps the slots for a quantum, the
next task is chosen by waiting time and queue size, no request waits past a bound, tasks that fit
together batch together; and on the real engine, greedy answers do not depend on the policy."""

from __future__ import annotations

import asyncio
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))

from engine_helpers import greedy_request, started_engine
from pipeline import build_pipeline

from retrieval.service import Route
from server.engine_api import GenerationRequest, SamplingParams
from server.loading import ServeConfig
from server.scheduler import Scheduler, Sequence
from server.switch_scheduler import SwitchAwareScheduler, make_scheduler

# Two slots per layer; each task needs two experts: no two tasks fit together (a1 and a2 share a's).
SELECTIONS = {t: {0: [2 * i, 2 * i + 1]} for i, t in enumerate("abcdef")} | {"a1": {0: [0]}, "a2": {0: [1]}}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _sequence(name: str, task: str, arrived: float) -> Sequence:
    route = Route(task=task, mode="pruned", selection=SELECTIONS[task])
    request = GenerationRequest(name, [1, 2], name, SamplingParams(max_tokens=2))
    return Sequence(request=request, emit=lambda _: None, detokenizer=None, route=route, arrived=arrived)


def _scheduler(quantum=4, max_switches=4, batch=2, slots=2) -> tuple[SwitchAwareScheduler, Clock]:
    clock = Clock()
    return SwitchAwareScheduler(slots, batch, quantum, max_switches, clock), clock


def _add(scheduler: SwitchAwareScheduler, tasks: str, start: float = 0.0) -> None:
    for i, task in enumerate(tasks.split()):
        scheduler.waiting.append(_sequence(f"{task}{len(scheduler.waiting)}-{i}", task, start + i))


def _tasks(batch: list[Sequence]) -> list[str]:
    return [s.route.task for s in batch]


def test_a_spent_quantum_hands_the_slots_to_another_task():
    scheduler, _ = _scheduler(quantum=4, batch=2)
    _add(scheduler, "a a a a a a a b")  # a's queue outweighs b's throughout
    served = [_tasks(scheduler.form_batch()) for _ in range(4)]
    assert served == [["a", "a"], ["a", "a"], ["b"], ["a", "a"]]


def test_interleaved_tasks_are_served_in_runs_not_alternately():
    scheduler, _ = _scheduler(quantum=4, batch=2)
    _add(scheduler, "a b a b a b a b")  # each batch takes one task's waiting requests
    served = [_tasks(scheduler.form_batch()) for _ in range(4)]
    assert served == [["a", "a"], ["b", "b"], ["a", "a"], ["b", "b"]]


def test_new_arrivals_of_the_resident_task_join_until_the_quantum_is_spent():
    scheduler, _ = _scheduler(quantum=3, batch=8)
    _add(scheduler, "a b")
    running = scheduler.form_batch()
    assert _tasks(running) == ["a"]
    _add(scheduler, "a a a", start=10)
    assert _tasks(scheduler.form_batch(running=running)) == ["a", "a"]  # 3 admitted: the quantum
    assert scheduler.form_batch(running=running) == []  # b waits: the batch drains
    assert _tasks(scheduler.form_batch()) == ["b"]


def test_without_a_competitor_the_resident_task_keeps_joining():
    scheduler, _ = _scheduler(quantum=1, batch=8)
    _add(scheduler, "a")
    running = scheduler.form_batch()
    _add(scheduler, "a a", start=5)
    assert _tasks(scheduler.form_batch(running=running)) == ["a", "a"]


def test_the_next_task_has_the_most_total_waiting_time():
    scheduler, clock = _scheduler(quantum=1, batch=4)
    _add(scheduler, "a")
    assert _tasks(scheduler.form_batch()) == ["a"]
    scheduler.waiting.append(_sequence("b-old", "b", arrived=0.0))  # oldest, alone
    for i in range(4):
        scheduler.waiting.append(_sequence(f"c{i}", "c", arrived=60.0 + i))  # younger, but four
    clock.now = 100.0  # b waited 100 s in all, c 4 x ~38 s = 154 s
    assert _tasks(scheduler.form_batch()) == ["c"] * 4
    assert _tasks(scheduler.form_batch()) == ["b"]


def test_an_older_request_wins_among_equal_queues():
    scheduler, _ = _scheduler(quantum=1, batch=4)
    scheduler.waiting.extend([_sequence("c", "c", 5.0), _sequence("b", "b", 1.0)])
    assert _tasks(scheduler.form_batch()) == ["b"]


def test_a_flooded_task_never_starves_another():
    """Task a floods (a new request every step, each older waiting group outweighing b); b's one
    request is served after at most ``max_switches`` switches of the slots."""
    scheduler, clock = _scheduler(quantum=2, max_switches=2, batch=2)
    scheduler.waiting.append(_sequence("lonely", "b", arrived=50.0))
    for i in range(40):
        scheduler.waiting.append(_sequence(f"c{i}", "c", arrived=0.0))
        scheduler.waiting.append(_sequence(f"a{i}", "a", arrived=0.0))
    served_before = 0
    for step in range(40):
        clock.now += 1
        scheduler.waiting.append(_sequence(f"new{step}", "a", arrived=clock.now))
        batch = scheduler.form_batch()
        if any(s.request_id == "lonely" for s in batch):
            break
        served_before += len(batch)
    else:
        pytest.fail("the lonely request was never served")
    # At most max_switches + 1 quanta of other requests went first.
    assert served_before <= (scheduler.max_switches + 1) * scheduler.quantum


def test_a_request_that_waited_enough_switches_makes_the_running_batch_drain():
    scheduler, _ = _scheduler(quantum=100, max_switches=1, batch=8)
    _add(scheduler, "a b")
    running = scheduler.form_batch()
    assert scheduler.waiting[0].switches_waited == 1  # the switch to a passed it over
    _add(scheduler, "a", start=5)
    assert scheduler.form_batch(running=running) == []
    assert _tasks(scheduler.form_batch()) == ["b"]


def test_tasks_that_fit_together_are_co_resident_and_batch_together():
    scheduler, _ = _scheduler(quantum=2, batch=8, slots=4)  # room for two tasks' experts
    _add(scheduler, "a b a b c")
    assert _tasks(scheduler.form_batch()) == ["a", "a", "b", "b"]
    assert scheduler.resident == {"a", "b"}
    assert _tasks(scheduler.form_batch()) == ["c"]


def test_requests_sharing_experts_with_the_resident_task_join_it():
    scheduler, _ = _scheduler(quantum=8, batch=8, slots=2)
    _add(scheduler, "a1")
    running = scheduler.form_batch()
    _add(scheduler, "b a2", start=3)
    assert _tasks(scheduler.form_batch(running=running)) == ["a2"]


def test_the_policy_is_chosen_by_name():
    assert type(make_scheduler("fifo", 4, 2)) is Scheduler
    assert isinstance(make_scheduler("switch-aware", 4, 2), SwitchAwareScheduler)
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_scheduler("lifo", 4, 2)


def _closed_loop(scheduler: Scheduler, clock: Clock, clients: int, total: int = 400) -> tuple[float, int]:
    """Simulated engine steps: ``clients`` each keep one request of a random task (6 tasks, one fits
    the slots) in flight; every request decodes 16 steps. Returns (switches per 100 requests, the
    longest wait in steps)."""
    rng = random.Random(0)

    def submit(i: int) -> Sequence:
        return _sequence(f"r{i}", rng.choice("abcdef"), clock.now)

    scheduler.waiting.extend(submit(i) for i in range(clients))
    batch, resident, switches, done, longest, left = [], set(), 0, 0, 0, {}
    while done < total:
        joined = scheduler.form_batch(running=batch) if batch else scheduler.form_batch()
        longest = max([longest, *(clock.now - s.arrived for s in joined)])
        left |= {s.request_id: 16 for s in joined}
        batch += joined
        tasks = {s.route.task for s in batch}
        switches, resident = switches + len(tasks - resident), tasks
        clock.now += 1
        for s in batch:
            left[s.request_id] -= 1
        finished = [s for s in batch if not left[s.request_id]]
        batch = [s for s in batch if left[s.request_id]]
        scheduler.waiting.extend(submit(done + clients + i) for i in range(len(finished)))
        done += len(finished)
    return 100 * switches / done, longest


@pytest.mark.parametrize("clients", [16, 64])
def test_under_closed_loop_mixed_traffic_switches_and_waits_are_no_worse_than_fifo(clients):
    fifo_clock, aware_clock = Clock(), Clock()
    fifo = _closed_loop(Scheduler(2, 16), fifo_clock, clients)
    aware = _closed_loop(SwitchAwareScheduler(2, 16, clock=aware_clock), aware_clock, clients)
    assert aware[0] <= fifo[0] and aware[1] <= fifo[1]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return build_pipeline(tmp_path_factory.mktemp("scheduler"))


@pytest.mark.anyio
async def test_greedy_answers_do_not_depend_on_the_policy(pipeline):
    store, patterns = pipeline
    texts = [
        "Reverse the letters of the word zebra.",
        "What is 3 plus 10?",
        "Reverse the letters of the word moon.",
        "What is 8 plus 15?",
    ]
    answers = {}
    for policy in ("fifo", "switch-aware"):
        config = ServeConfig(store, patterns, keep=0.5, slots_per_layer=4)
        engine = await started_engine(config, max_batch_size=4, scheduler=policy)

        async def run(name: str, text: str, engine=engine) -> list[int]:
            request = greedy_request(engine.tokenizer, name, text, 12)
            return [t async for output in engine.generate(request) for t in output.token_ids]

        try:
            answers[policy] = await asyncio.gather(*(run(f"r{i}", t) for i, t in enumerate(texts)))
        finally:
            await engine.shutdown()
    assert answers["fifo"] == answers["switch-aware"]
    assert all(len(tokens) == 12 for tokens in answers["fifo"])
