"""The real engine's log probabilities, samples and prompt scoring on a tiny model: log probabilities
equal ``log_softmax`` of the reference transformers model's logits under the same pattern, ``n``
samples share one prefill and are reproducible with a seed, and ``max_tokens = 0`` scores the
prompt alone."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import chat_ids, started_engine
from pipeline import build_pipeline

from expert_store.errors import RequestError
from expert_store.runtime import RuntimeConfig, load_runtime
from retrieval.calibrate import load_patterns_for_store
from retrieval.selection import Budget
from retrieval.service import PatternRouter
from server.engine_api import GenerationRequest, SamplingParams, TaerOptions
from server.loading import ServeConfig

QUESTION = "What is 3 plus 10?"
TOLERANCE = 1e-4  # batched (left-padded, KV-cached) against one plain forward, in float32


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return build_pipeline(tmp_path_factory.mktemp("engine-logprobs"))


async def _outputs(engine, request):
    return [output async for output in engine.generate(request)]


def _reference_logprobs(store, patterns, task: str, ids: list[int]) -> torch.Tensor:
    """log_softmax of the transformers model's logits at every position, with ``task``'s pattern."""
    router = PatternRouter(load_patterns_for_store(patterns, store), Budget(keep=0.5))
    runtime = load_runtime(store, RuntimeConfig(slots_per_layer=4))
    runtime.activate(router.selection(task), "pruned")
    with torch.inference_mode():
        logits = runtime.model(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)  # [S, V]


@pytest.mark.anyio
async def test_logprobs_and_prompt_logprobs_equal_the_reference_model(pipeline):
    store, patterns = pipeline
    engine = await started_engine(ServeConfig(store, patterns, keep=0.5))
    try:
        ids = chat_ids(engine.tokenizer, QUESTION)
        sampling = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3, prompt_logprobs=2)
        request = GenerationRequest("lp", ids, QUESTION, sampling, TaerOptions(task="arithmetic"))
        outputs = await _outputs(engine, request)
        scored = await _outputs(
            engine,
            GenerationRequest(
                "score",
                ids,
                QUESTION,
                SamplingParams(max_tokens=0, prompt_logprobs=0),
                TaerOptions(task="arithmetic"),
            ),
        )
    finally:
        await engine.shutdown()
    generated = [t for o in outputs for t in o.token_ids]
    entries = [e for o in outputs for e in o.logprobs]
    assert len(generated) == len(entries) == 6 and [e.token_id for e in entries] == generated

    reference = _reference_logprobs(store, patterns, "arithmetic", ids + generated)
    for step, entry in enumerate(entries):
        row = reference[len(ids) - 1 + step]
        assert entry.logprob == pytest.approx(row[entry.token_id].item(), abs=TOLERANCE)
        assert entry.token_id == int(row.argmax())  # greedy: the most likely token
        top = torch.topk(row, 3)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert [v for _, v in entry.top] == pytest.approx(top.values.tolist(), abs=TOLERANCE)

    prompt = outputs[0].prompt_logprobs
    assert prompt[0] is None and len(prompt) == len(ids)
    assert all(o.prompt_logprobs is None for o in outputs[1:])
    for position, entry in enumerate(prompt[1:]):
        assert entry.token_id == ids[position + 1] and len(entry.top) == 2
        assert entry.logprob == pytest.approx(reference[position, ids[position + 1]].item(), abs=TOLERANCE)

    # max_tokens = 0: the prompt scored, nothing generated.
    (only,) = scored
    assert only.finished and only.finish_reason == "length" and only.token_ids == []
    assert only.completion_tokens == 0 and only.routing.task == "arithmetic"
    assert [e.logprob for e in only.prompt_logprobs[1:]] == pytest.approx(
        [e.logprob for e in prompt[1:]], abs=TOLERANCE
    )


@pytest.mark.anyio
async def test_n_samples_share_one_prefill_and_are_reproducible_with_a_seed(pipeline):
    store, patterns = pipeline
    engine = await started_engine(ServeConfig(store, patterns, keep=0.5), max_batch_size=8)
    shapes: list[tuple[int, int]] = []
    model = engine.parts.runtime.model
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        ids = chat_ids(engine.tokenizer, QUESTION)
        sampling = SamplingParams(max_tokens=8, temperature=1.2, seed=11, ignore_eos=True, n=3, logprobs=0)
        first = await _outputs(engine, GenerationRequest("n1", ids, QUESTION, sampling))
        prefill_shapes = [s for s in shapes if s[1] > 1]
        second = await _outputs(engine, GenerationRequest("n2", ids, QUESTION, sampling))
        alone = SamplingParams(max_tokens=8, temperature=1.2, seed=11, ignore_eos=True)
        single = await _outputs(engine, GenerationRequest("one", ids, QUESTION, alone))
    finally:
        hook.remove()
        await engine.shutdown()

    def samples(outputs):
        tokens: dict[int, list[int]] = {}
        for output in outputs:
            tokens.setdefault(output.index, []).extend(output.token_ids)
        return tokens

    assert prefill_shapes == [(1, len(ids))]  # one prefill row for three samples
    assert sorted(samples(first)) == [0, 1, 2]
    assert all(len(tokens) == 8 for tokens in samples(first).values())
    assert samples(first) == samples(second)  # reproducible with the seed
    assert len({tuple(tokens) for tokens in samples(first).values()}) > 1  # the samples differ
    assert samples(first)[0] == samples(single)[0]  # sample 0 uses the seed itself
    finished = [o for o in first if o.finished]
    assert sorted(o.index for o in finished) == [0, 1, 2] and first[-1].finished
    assert all(o.completion_tokens == 8 for o in finished)
    assert sum(1 for o in first if o.routing is not None) == 3  # each sample's first output


@pytest.mark.anyio
async def test_a_tokenizer_the_grammar_engine_cannot_read_is_a_400_each_time_tried_once(
    pipeline, monkeypatch
):
    import server.structured

    tried = []

    def unreadable(*args, **kwargs):
        tried.append(args)
        raise ValueError("can't determine decoder type")

    monkeypatch.setattr(server.structured, "GrammarCompiler", unreadable)
    store, patterns = pipeline
    engine = await started_engine(ServeConfig(store, patterns, keep=0.5))
    try:
        ids = chat_ids(engine.tokenizer, QUESTION)
        for param in ("response_format", "parameters.grammar"):
            constraint = server.structured.OutputConstraint("json_object", param=param)
            request = GenerationRequest(
                param, ids, QUESTION, SamplingParams(max_tokens=4, constraint=constraint)
            )
            with pytest.raises(RequestError, match="not available for this model's tokenizer") as caught:
                await _outputs(engine, request)
            assert caught.value.param == param
        plain = await _outputs(
            engine, GenerationRequest("plain", ids, QUESTION, SamplingParams(max_tokens=2))
        )
    finally:
        await engine.shutdown()
    assert len(tried) == 1 and plain[-1].finished
