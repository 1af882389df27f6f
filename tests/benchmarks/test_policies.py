"""Smoke test of the policies benchmark on the tiny labelled pipeline: the counters mean what they say."""

from __future__ import annotations

import pytest
import torch
from bench_fixtures import tiny_bench

from benchmarks.policies import greedy, interleaved_prompts, run_policies, slots_for
from benchmarks.policies_render import exact_agreement, render
from expert_store.runtime import load_runtime


@pytest.fixture(scope="module")
def bench():
    return tiny_bench()


@pytest.fixture(scope="module")
def result(bench):
    prompts = interleaved_prompts(bench.tasks, per_task=3)
    return run_policies(bench.store, bench.patterns, prompts, keeps=(0.5, 0.25), max_new_tokens=8)


def test_slots_for_rounds_up_and_respects_top_k():
    assert slots_for(0.25, 16, 2) == 4
    assert slots_for(0.5, 8, 2) == 4
    assert slots_for(0.1, 16, 2) == 2  # never below top-k
    assert slots_for(1.0, 16, 2) == 16


def test_interleaved_prompts_take_turns_across_tasks(bench):
    prompts = interleaved_prompts(bench.tasks, per_task=3)
    assert [p.task for p in prompts] == ["arithmetic", "reverse"] * 3
    assert all(p.answer is not None and p.query for p in prompts)


def test_greedy_equals_transformers_generate(bench):
    runtime = load_runtime(bench.store)
    runtime.activate_all()
    ids = torch.tensor([runtime.tokenizer("What is 3 plus 4?")["input_ids"]])
    expected = runtime.model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=2, pad_token_id=0)
    got = greedy(runtime.model, ids, 10, {2})
    assert got.tokens == expected[0, ids.shape[1] :].tolist()
    assert got.prefill_seconds > 0 and got.decode_seconds > 0


def test_policies_side_by_side(result):
    reference = result["reference"]
    assert reference["slots_per_layer"] == 8 and reference["expert_loads"] == 0
    assert reference["hit_rate"] == 1.0 and reference["misses_per_token"] == 0
    by_budget = {b["keep"]: {p["policy"]: p for p in b["policies"]} for b in result["budgets"]}
    assert set(by_budget) == {0.5, 0.25}
    for keep, slots in ((0.5, 4), (0.25, 2)):
        a, b, c = (by_budget[keep][name] for name in ("pruned", "prefetch", "lru"))
        assert a["slots_per_layer"] == b["slots_per_layer"] == c["slots_per_layer"] == slots
        assert a["expert_memory_bytes"] == reference["expert_memory_bytes"] * slots // 8
        # Pruned routing never leaves the retained set; the on-demand policy loads only on misses.
        assert a["misses_per_token"] == 0 and a["hit_rate"] == 1.0
        assert c["expert_loads"] == c["expert_misses"] > 0
        assert b["expert_loads"] >= b["expert_misses"]
        assert a["retrieval_accuracy"] == b["retrieval_accuracy"] == 1.0
        assert c["retrieval_accuracy"] is None
        # Exact mode is the model's own routing, so it decodes exactly what the reference decodes.
        assert b["outputs"] == c["outputs"] == reference["outputs"]
        assert b["accuracy"] == c["accuracy"] == reference["accuracy"]
        assert a["decode_tokens_per_s"] > 0 and a["ttft_ms_p50"] > 0
    assert set(exact_agreement(result).values()) == {1.0}


def test_targets_and_render(result):
    names = [t["target"] for t in result["targets"]]
    assert len(names) == 6 and names[0] == "keep 50%: (a) tokens/s >= 0.95x (d)"
    by_budget = {b["keep"]: {p["policy"]: p for p in b["policies"]} for b in result["budgets"]}
    ratio = by_budget[0.5]["pruned"]["decode_tokens_per_s"] / result["reference"]["decode_tokens_per_s"]
    assert result["targets"][0]["measured"] == pytest.approx(ratio)
    assert result["targets"][0]["met"] == (ratio >= 0.95)
    markdown = render(result)
    assert "| (c) exact, on-demand + LRU, no prediction | 25% | 2 |" in markdown
    assert "prefetch@25% 100%" in markdown
    assert ("**MISSED**" in markdown) == (not all(t["met"] for t in result["targets"]))
