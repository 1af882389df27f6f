"""`taer serve --record` in the engine: one record per request, in every mode, whose routing equals
what calibration computes from the model's own router logits for that prompt alone (softmax routers,
and DeepSeek-V3's sigmoid scores with a selection bias and expert groups); a request the router
check re-routes is recorded once, with the route that served it."""

from __future__ import annotations

import asyncio

import pytest
import torch
from engine_helpers import chat_ids, greedy_request, started_engine
from pipeline import build_pipeline, build_separable_pipeline

from expert_store.runtime import load_runtime
from retrieval.calibrate import load_patterns_for_store
from retrieval.routing_record import read_records, sha256_text
from retrieval.selection import Budget
from retrieval.service import PatternRouter, Route
from retrieval.tcess import TaskStatsAccumulator
from server.engine_api import GenerationRequest, SamplingParams, TaerOptions
from server.loading import ServeConfig
from server.record_files import RecordOptions

pytestmark = pytest.mark.anyio
QUESTIONS = ("What is 5 plus 12? Add the two numbers.", "Reverse the letters of the word melon.")


@pytest.fixture(scope="module", params=["qwen3_moe", "deepseek_v3"])
def pipeline(request, tmp_path_factory):
    return build_pipeline(tmp_path_factory.mktemp("recording"), family=request.param)


async def _drain(engine, request, route=None) -> str:
    return "".join([output.text async for output in engine.generate(request, route)])


def _own_routing(store, text: str, thresholds) -> tuple:
    """(TCESS x tokens, top-k counts) of ``text``'s chat prompt alone, every expert resident."""
    runtime = load_runtime(store)
    runtime.activate_all()
    ids = chat_ids(runtime.tokenizer, text)
    layout = runtime.layout
    gates = [gate.inner for gate in runtime.gates()]
    accumulator = TaskStatsAccumulator(len(gates), layout.num_experts, layout.top_k)
    if runtime.gates()[0].family.scoring == "sigmoid_group":  # as calibration sets it up
        bias = [gate.e_score_correction_bias.float() for gate in gates]
        groups = {"num_groups": gates[0].num_group, "topk_groups": gates[0].topk_group}
        accumulator = TaskStatsAccumulator(
            len(gates), layout.num_experts, layout.top_k, scoring="sigmoid_bias", bias=bias, **groups
        )
    rows = {layer: row for row, layer in enumerate(layout.moe_layers)}
    runtime.set_router_observer(lambda layer, hidden, logits: accumulator.add(rows[layer], logits))
    runtime.model(input_ids=torch.tensor([ids]))
    runtime.close()
    stats = accumulator.finalize(threshold=thresholds.tolist())
    return stats.tcess * len(ids), stats.frequency * len(ids), len(ids)


async def test_every_request_is_recorded_once_with_its_own_routing(pipeline, tmp_path):
    store, patterns = pipeline
    records = tmp_path / "records"
    config = ServeConfig(store, patterns, keep=0.5, mode="exact")
    engine = await started_engine(config, record=RecordOptions(records, with_text=True), max_batch_size=8)
    try:
        tokenizer = engine.tokenizer
        requests = [greedy_request(tokenizer, f"q{i}", text, 6) for i, text in enumerate(QUESTIONS)]
        two = GenerationRequest("n2", chat_ids(tokenizer, QUESTIONS[0]), QUESTIONS[0], SamplingParams(n=2))
        full = greedy_request(tokenizer, "full", QUESTIONS[1], 3)
        full.taer = TaerOptions(mode="full")
        await asyncio.gather(*(_drain(engine, r) for r in [*requests, two, full]))  # batched prefills
    finally:
        await engine.shutdown()
    found = {record.request_id: record for record in read_records(records)}
    assert sorted(found) == ["full", "n2", "q0", "q1"]  # the two samples of n2 share one record
    assert (found["q0"].task, found["q0"].mode) == ("arithmetic", "exact")
    assert (found["q1"].task, found["full"].task, found["full"].mode) == ("reverse", None, "full")
    assert found["q1"].retrieval_text == QUESTIONS[1] and found["q1"].prompt.startswith("<user>Reverse")
    assert found["q1"].prompt_sha256 == sha256_text(found["q1"].prompt)
    pattern_set = load_patterns_for_store(patterns, store)
    for name, text in (("q0", QUESTIONS[0]), ("q1", QUESTIONS[1]), ("full", QUESTIONS[1])):
        record = found[name]
        thresholds = pattern_set.get(record.task or "general").stats.thresholds
        sums, counts, tokens = _own_routing(store, text, thresholds)
        assert record.num_tokens == tokens
        assert torch.equal(record.counts.double(), counts.double().round())
        torch.testing.assert_close(record.tcess_sums, sums.double(), rtol=1e-4, atol=1e-4)


async def test_a_rerouted_request_is_recorded_once_with_the_route_that_served_it(tmp_path_factory):
    store, patterns = build_separable_pipeline(tmp_path_factory.mktemp("separable"))
    router = PatternRouter(load_patterns_for_store(patterns, store), Budget(keep=0.5))
    wrong = Route("letters", "pruned", router.selection("letters"), similarity=0.9, confidence=0.9)
    records = tmp_path_factory.mktemp("records")
    engine = await started_engine(ServeConfig(store, patterns, keep=0.5), record=RecordOptions(records))
    try:
        text = "12+34=46; 56+78=134; 90+12=102; 34+56=90; 11+22="
        await _drain(engine, greedy_request(engine.tokenizer, "digits", text, 4), wrong)
    finally:
        await engine.shutdown()
    (record,) = read_records(records)
    assert (record.request_id, record.task, record.mode) == ("digits", "digits", "pruned")
    assert record.prompt is None and record.retrieval_sha256 == sha256_text(text)  # hashes only by default
