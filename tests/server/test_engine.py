"""The real engine on a tiny model: answers equal direct generation with the same pattern, batching
never changes an answer, aborts free their place, sampling is reproducible."""

from __future__ import annotations

import asyncio

import pytest
import torch
from engine_helpers import chat_ids, started_engine
from pipeline import build_pipeline

from expert_store.runtime import RuntimeConfig, load_runtime
from retrieval.calibrate import load_patterns_for_store
from retrieval.selection import Budget
from retrieval.service import PatternRouter
from server.engine_api import GenerationRequest, SamplingParams, TaerOptions
from server.loading import ServeConfig

PROMPTS = [
    "What is 3 plus 10?",
    "Reverse the letters of the word zebra.",
    "What is 21 plus 28?",
    "Reverse the word stone.",
]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return build_pipeline(tmp_path_factory.mktemp("engine"))


async def _collect(engine, request):
    text, outputs = "", []
    async for output in engine.generate(request):
        text += output.text
        outputs.append(output)
    return text, outputs


@pytest.mark.anyio
async def test_greedy_answer_equals_direct_generation_with_the_retrieved_pattern(pipeline):
    store, patterns = pipeline
    engine = await started_engine(ServeConfig(store, patterns, keep=0.5))
    try:
        tokenizer = engine.tokenizer
        request = GenerationRequest(
            "a", chat_ids(tokenizer, PROMPTS[0]), PROMPTS[0], SamplingParams(max_tokens=10, temperature=0)
        )
        text, outputs = await _collect(engine, request)
    finally:
        await engine.shutdown()
    routing = outputs[0].routing
    assert routing.task == "arithmetic" and routing.mode == "pruned" and routing.similarity > 0.5
    assert outputs[-1].finished and outputs[-1].finish_reason in ("stop", "length")
    assert all(o.routing is None for o in outputs[1:])

    router = PatternRouter(load_patterns_for_store(patterns, store), Budget(keep=0.5))
    runtime = load_runtime(store, RuntimeConfig(slots_per_layer=4))
    runtime.activate(router.selection("arithmetic"), "pruned")
    prompt = torch.tensor([request.prompt_token_ids])
    direct = runtime.model.generate(
        prompt, max_new_tokens=10, do_sample=False, eos_token_id=2, pad_token_id=0
    )
    generated = [t for t in direct[0, prompt.shape[1] :].tolist()]
    assert [t for o in outputs for t in o.token_ids] == generated[
        : len([t for o in outputs for t in o.token_ids])
    ]
    assert text == tokenizer.decode(generated, skip_special_tokens=True)


@pytest.mark.anyio
async def test_eight_concurrent_requests_each_get_their_own_answer(pipeline):
    store, patterns = pipeline
    engine = await started_engine(ServeConfig(store, patterns, keep=0.5, slots_per_layer=8), max_batch_size=8)
    try:
        tokenizer = engine.tokenizer

        def request(i, text, mode=None):
            return GenerationRequest(
                f"r{i}",
                chat_ids(tokenizer, text),
                text,
                SamplingParams(max_tokens=12, temperature=0),
                TaerOptions(mode=mode),
            )

        modes = [None, None, "exact", "full"]
        alone = [(await _collect(engine, request(i, t, modes[i])))[0] for i, t in enumerate(PROMPTS)]
        together = await asyncio.gather(
            *[_collect(engine, request(10 + i, PROMPTS[i % 4], modes[i % 4])) for i in range(8)]
        )
    finally:
        await engine.shutdown()
    assert [text for text, _ in together] == [alone[i % 4] for i in range(8)]
    assert len(set(alone)) > 1


@pytest.mark.anyio
async def test_abort_stops_generation_and_sampling_is_reproducible(pipeline):
    store, patterns = pipeline
    engine = await started_engine(ServeConfig(store, patterns, keep=0.5))
    try:
        tokenizer = engine.tokenizer
        ids = chat_ids(tokenizer, PROMPTS[1])
        sampled = SamplingParams(max_tokens=16, temperature=1.5, top_p=0.9, top_k=20, seed=7, ignore_eos=True)
        first = await _collect(engine, GenerationRequest("s1", ids, PROMPTS[1], sampled))
        second = await _collect(engine, GenerationRequest("s2", ids, PROMPTS[1], sampled))
        assert first[0] == second[0] and first[1][-1].finish_reason == "length"
        assert first[1][-1].completion_tokens == 16

        long = GenerationRequest(
            "long", ids, PROMPTS[1], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        )
        stream = engine.generate(long)
        await stream.__anext__()
        await engine.abort("long")
        rest = [o async for o in stream]
        assert rest[-1].finish_reason == "abort" and rest[-1].completion_tokens < 200
        forced = await _collect(
            engine,
            GenerationRequest(
                "f",
                ids,
                PROMPTS[1],
                SamplingParams(max_tokens=4, temperature=0),
                TaerOptions(task="arithmetic"),
            ),
        )
        assert forced[1][0].routing.task == "arithmetic" and forced[1][0].routing.similarity is None
    finally:
        await engine.shutdown()
