"""The engine on an int8 store: calibrated and served like any other, its greedy answers equal direct
generation from the same slots, --expert-memory counts the stored bytes, the dtype is reported."""

from __future__ import annotations

import asyncio

import pytest
import torch
from engine_helpers import chat_ids, started_engine
from pipeline import build_pipeline

from expert_store.runtime import RuntimeConfig, load_runtime, slot_bytes_per_expert
from expert_store.store import ExpertStore
from retrieval.calibrate import load_patterns_for_store
from retrieval.selection import Budget
from retrieval.service import PatternRouter
from server.engine_api import GenerationRequest, SamplingParams
from server.loading import ServeConfig, plan_budget
from server.metrics import Metrics

PROMPT = "What is 3 plus 10?"


@pytest.fixture(scope="module")
def int8_pipeline(tmp_path_factory):
    return build_pipeline(tmp_path_factory.mktemp("int8"), expert_dtype="int8")


@pytest.mark.anyio
async def test_int8_store_serves_what_its_runtime_generates_and_reports_its_dtype(int8_pipeline):
    store, patterns = int8_pipeline
    metrics = Metrics()
    engine = await started_engine(ServeConfig(store, patterns, keep=0.5), metrics)
    try:
        request = GenerationRequest(
            "a", chat_ids(engine.tokenizer, PROMPT), PROMPT, SamplingParams(max_tokens=10, temperature=0)
        )
        text = ""
        async for output in engine.generate(request):
            text += output.text
        described = await asyncio.to_thread(engine.describe)
    finally:
        await engine.shutdown()
    assert described["expert_dtype"] == "int8-channel"
    assert 'taer_expert_capacity_bytes{dtype="int8-channel"}' in metrics.render().decode()

    router = PatternRouter(load_patterns_for_store(patterns, store), Budget(keep=0.5))
    runtime = load_runtime(store, RuntimeConfig(slots_per_layer=4))
    runtime.activate(router.selection("arithmetic"), "pruned")
    ids = torch.tensor([chat_ids(runtime.tokenizer, PROMPT)])
    out = runtime.model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    expected = runtime.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert text == expected
    runtime.close()


def test_expert_memory_counts_stored_bytes(int8_pipeline, tmp_path):
    store_dir, patterns = int8_pipeline
    store = ExpertStore(store_dir)
    layout = store.layout
    stored = store.manifest.bytes_per_expert  # int8 weights and float32 scales
    assert slot_bytes_per_expert(store, torch.float32) == stored
    assert slot_bytes_per_expert(store, torch.bfloat16) == stored  # the compute dtype buys nothing here
    full_precision = layout.params_per_expert * 4
    memory = 3 * full_precision * len(layout.moe_layers)  # 3 float32 experts per layer
    _, slots = plan_budget(ServeConfig(store_dir, patterns, expert_memory=memory), store, stored)
    store.close()
    assert slots == min(layout.num_experts, memory // (stored * len(layout.moe_layers))) > 3
    runtime = load_runtime(store_dir, RuntimeConfig(expert_memory=memory))
    assert runtime.num_slots == slots
    assert runtime.cache.capacity_bytes == slots * stored * len(layout.moe_layers) <= memory
    runtime.close()
