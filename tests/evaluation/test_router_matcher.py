"""The paper's router matcher: signatures as defined, a partial forward pass, matching, save/load."""

from __future__ import annotations

import pytest
import torch
from pipeline import TASK_PROMPTS, build_pipeline

from evaluation.router_matcher import (
    SUBDIR,
    RouterMatcher,
    RouterSignatures,
    build_router_signatures,
    ensure_router_signatures,
    prompt_signatures,
    request_text,
)
from expert_store.errors import PatternError
from expert_store.runtime import RuntimeConfig, load_runtime
from retrieval.tasks_file import load_tasks_file


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("router_matcher")
    store, patterns = build_pipeline(root, with_index=False)
    return store, patterns, root / "tasks" / "tasks.yaml"


@pytest.fixture(scope="module")
def runtime(pipeline):
    runtime = load_runtime(pipeline[0], RuntimeConfig(slots_per_layer=2))
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def signatures(runtime, pipeline):
    return build_router_signatures(runtime, load_tasks_file(pipeline[2]), batch_size=5)


def test_signature_is_the_mean_router_probability_of_the_first_moe_layer(runtime):
    texts = [request_text(runtime.tokenizer, q) for q in ("What is 3 plus 4?", "Reverse the word stone.")]
    got = prompt_signatures(runtime, texts, batch_size=2)  # [2, E], padded together
    assert runtime.cache.stats.loads == 0  # the pass stopped at the router: no expert was needed

    # Reference: a whole forward pass of each prompt alone, every expert resident, logits recorded.
    full = load_runtime(runtime.store.store_dir)
    full.activate_all()
    first = full.layout.moe_layers[0]
    seen = {}
    full.set_router_observer(lambda layer, hidden, logits: seen.setdefault(layer, logits.clone()))
    for row, text in enumerate(texts):
        seen.clear()
        ids = full.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        full.model(input_ids=ids)
        expected = seen[first].float().softmax(dim=-1).mean(dim=0)  # [E]
        torch.testing.assert_close(got[row], expected, rtol=1e-5, atol=1e-6)
    full.close()
    torch.testing.assert_close(got.sum(dim=-1), torch.ones(2))


def test_prompts_worded_like_a_tasks_calibration_match_it(runtime, signatures):
    assert signatures.tasks == tuple(TASK_PROMPTS)
    assert signatures.num_prompts == {name: len(prompts) for name, prompts in TASK_PROMPTS.items()}
    matcher = RouterMatcher(runtime, signatures)
    queries = {
        "arithmetic": [
            "What is 40 plus 47? Add the two numbers.",
            "What is 81 plus 88? Add the two numbers.",
        ],
        "reverse": ["Reverse the letters of the word zebra.", "Reverse the letters of the word kitchen."],
    }
    texts = [q for qs in queries.values() for q in qs]
    matches = matcher.match(texts)
    assert [m.task for m in matches] == [task for task, qs in queries.items() for _ in qs]
    for match in matches:
        _task, distance, confidence = match  # a plain tuple too
        assert distance >= 0.0 and 0.0 < confidence <= 1.0
    # With a confidence floor no match reaches, every query falls back to the pooled pattern.
    strict = RouterMatcher(runtime, signatures, min_confidence=1.01)
    assert {m.task for m in strict.match(texts)} == {"general"}
    assert matcher.match([]) == []


def test_save_load_round_trip_and_refusals(tmp_path, runtime, signatures):
    signatures.save(tmp_path / "sig")
    loaded = RouterSignatures.load(tmp_path / "sig", expected_fingerprint=runtime.store.manifest.fingerprint)
    assert torch.equal(loaded.signatures, signatures.signatures)
    assert (loaded.tasks, loaded.layer, loaded.num_prompts, loaded.created) == (
        signatures.tasks,
        signatures.layer,
        signatures.num_prompts,
        signatures.created,
    )
    with pytest.raises(PatternError, match="belong to model"):
        RouterSignatures.load(tmp_path / "sig", expected_fingerprint="another-model")
    foreign = RouterSignatures("another-model", signatures.tasks, signatures.signatures, signatures.layer)
    with pytest.raises(PatternError, match="cannot match"):
        RouterMatcher(runtime, foreign)
    with pytest.raises(PatternError, match="cannot read"):
        RouterSignatures.load(tmp_path / "missing")


def test_ensure_builds_once_under_the_patterns_dir(pipeline, runtime, signatures):
    _store, patterns, tasks = pipeline
    built = ensure_router_signatures(runtime, patterns, load_tasks_file(tasks))
    assert (patterns / SUBDIR / "signatures.safetensors").is_file()
    torch.testing.assert_close(built.signatures, signatures.signatures)
    stamp = (patterns / SUBDIR / "signatures.json").stat().st_mtime_ns
    again = ensure_router_signatures(runtime, patterns, load_tasks_file(tasks))
    assert (patterns / SUBDIR / "signatures.json").stat().st_mtime_ns == stamp
    assert torch.equal(again.signatures, built.signatures)
