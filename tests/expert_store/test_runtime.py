"""The runtime against the reference transformers model, for every family."""

from __future__ import annotations

import random

import pytest
import torch
from reference import pruned_reference
from tiny_models import FAMILIES, padded_inputs

from expert_store.errors import BudgetError, SelectionError
from expert_store.runtime import RuntimeConfig, load_runtime

TOL = 1e-5


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _moe_layers(model):
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch", [1, 2])
def test_all_experts_pruned_equals_reference(sharded, family, batch):
    reference, store, _ = sharded(family)
    runtime = load_runtime(store)
    runtime.activate_all()
    ids, mask = padded_inputs(batch)
    diff = (_logits(reference, ids, mask) - _logits(runtime.model, ids, mask))[mask.bool()]
    assert diff.abs().max().item() <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_identical(sharded, family):
    reference, store, _ = sharded(family)
    runtime = load_runtime(store)
    runtime.activate_all()
    ids, mask = padded_inputs(2)
    kwargs = dict(attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
    expected = reference.generate(ids, **kwargs)
    assert torch.equal(runtime.model.generate(ids, **kwargs), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_subset_equals_masked_reference(sharded, family):
    reference, store, _ = sharded(family)
    rng = random.Random(family)
    selection = {layer: sorted(rng.sample(range(8), 5)) for layer in _moe_layers(reference)}
    runtime = load_runtime(store, RuntimeConfig(slots_per_layer=5))
    runtime.activate(selection, "pruned")
    ids, mask = padded_inputs(2, seed=1)
    with pruned_reference(reference, selection):
        expected = _logits(reference, ids, mask)
    got = _logits(runtime.model, ids, mask)
    assert (expected - got)[mask.bool()].abs().max().item() <= TOL
    # and the restriction matters: the unrestricted model answers differently
    assert (_logits(reference, ids, mask) - got)[mask.bool()].abs().max().item() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_routing_never_picks_a_pruned_expert(sharded, family):
    reference, store, _ = sharded(family)
    selection = {layer: [0, 5] for layer in _moe_layers(reference)}  # top-k experts, split across groups
    runtime = load_runtime(store, RuntimeConfig(slots_per_layer=2))
    runtime.activate(selection, "pruned")
    chosen = []
    original = [m.forward for m in runtime.experts_modules()]
    for module, forward in zip(runtime.experts_modules(), original, strict=True):
        module.forward = lambda h, idx, w, _f=forward: (chosen.append(idx.unique().tolist()), _f(h, idx, w))[
            1
        ]
    _logits(runtime.model, *padded_inputs(2))
    assert chosen and all(set(ids) <= {0, 5} for ids in chosen)
    assert runtime.cache.stats.misses == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_mode_with_half_the_slots_equals_full_model(sharded, family):
    reference, store, _ = sharded(family)
    runtime = load_runtime(store, RuntimeConfig(slots_per_layer=4))
    runtime.activate({layer: [0, 1, 2, 3] for layer in _moe_layers(reference)}, "exact")
    ids, mask = padded_inputs(2, seed=2)
    diff = (_logits(reference, ids, mask) - _logits(runtime.model, ids, mask))[mask.bool()]
    assert diff.abs().max().item() <= TOL
    stats = runtime.cache.stats
    assert stats.misses > 0 and stats.hits > 0
    assert runtime.cache.resident_bytes <= runtime.cache.capacity_bytes
    assert all(len(experts) <= 4 for experts in runtime.cache.resident().values())


def test_exact_mode_processes_a_step_in_waves_when_slots_are_short(sharded):
    reference, store, _ = sharded("qwen3_moe")
    runtime = load_runtime(store, RuntimeConfig(slots_per_layer=2))  # a 2x12 prefill needs ~all 8
    runtime.activate({}, "exact")
    ids, mask = padded_inputs(2, seed=3)
    diff = (_logits(reference, ids, mask) - _logits(runtime.model, ids, mask))[mask.bool()]
    assert diff.abs().max().item() <= TOL
    assert all(len(experts) <= 2 for experts in runtime.cache.resident().values())


def test_switching_selections_loads_exactly_the_difference(sharded):
    reference, store, _ = sharded("qwen3_moe")
    layers = _moe_layers(reference)
    runtime = load_runtime(store, RuntimeConfig(slots_per_layer=4))
    first = runtime.activate({layer: [0, 1, 2, 3] for layer in layers})
    assert (first.loaded, first.reused) == (4 * len(layers), 0)
    second = runtime.activate({layer: [2, 3, 4, 5] for layer in layers})
    assert (second.loaded, second.reused, second.evicted) == (
        2 * len(layers),
        2 * len(layers),
        2 * len(layers),
    )
    assert runtime.cache.resident() == {layer: [2, 3, 4, 5] for layer in layers}
    again = runtime.activate({layer: [5, 4, 3, 2] for layer in layers})
    assert again.loaded == 0 and again.bytes_loaded == 0


def test_lru_eviction_keeps_recent_experts(sharded):
    reference, store, _ = sharded("qwen3_moe")
    layers = _moe_layers(reference)
    runtime = load_runtime(store, RuntimeConfig(slots_per_layer=4))
    runtime.activate({layer: [0, 1, 2, 3] for layer in layers})
    runtime.activate({layer: [0, 1] for layer in layers})  # 0, 1 now most recent
    runtime.activate({layer: [6, 7] for layer in layers})  # evicts 2 and 3
    assert runtime.cache.resident() == {layer: [0, 1, 6, 7] for layer in layers}


def test_on_demand_loads_evict_the_pattern_last(sharded):
    reference, store, _ = sharded("qwen3_moe")
    layer = _moe_layers(reference)[0]
    runtime = load_runtime(store, RuntimeConfig(slots_per_layer=4))
    runtime.activate({layer: [0, 1]}, "exact")  # the pattern, as a prefetch hint
    list(runtime.cache.waves(layer, [2, 3]))  # misses fill the free slots: 0 is now the oldest
    list(runtime.cache.waves(layer, [4]))  # plain LRU would evict 0; the pattern stays
    assert runtime.cache.resident()[layer] == [0, 1, 3, 4]
    list(runtime.cache.waves(layer, [5, 6, 7]))  # more than the non-pattern experts: then LRU
    assert runtime.cache.resident()[layer] == [1, 5, 6, 7]


def test_bad_selections_and_budgets_are_refused(sharded):
    reference, store, _ = sharded("qwen3_moe")
    layers = _moe_layers(reference)
    runtime = load_runtime(store, RuntimeConfig(slots_per_layer=3))
    with pytest.raises(SelectionError, match="at least top-k"):
        runtime.activate({layer: [1] for layer in layers})
    with pytest.raises(SelectionError, match="only 3 slots"):
        runtime.activate({layer: [0, 1, 2, 3] for layer in layers})
    with pytest.raises(SelectionError, match="outside"):
        runtime.activate({layer: [0, 99] for layer in layers})
    with pytest.raises(SelectionError, match="unknown mode"):
        runtime.activate({layer: [0, 1] for layer in layers}, "fast")
    with pytest.raises(BudgetError, match="top-k"):
        load_runtime(store, RuntimeConfig(slots_per_layer=1))
    with pytest.raises(BudgetError, match="fewer than top-k"):
        load_runtime(store, RuntimeConfig(expert_memory=100))


def test_byte_budget_sets_slots(sharded):
    reference, store, _ = sharded("qwen3_moe")
    runtime = load_runtime(store)
    per_expert = runtime.cache.banks[0].nbytes_per_slot
    budget = per_expert * 3 * len(_moe_layers(reference)) + per_expert - 1
    assert load_runtime(store, RuntimeConfig(expert_memory=budget)).num_slots == 3


def test_runtime_never_materialises_all_experts(sharded):
    _, store, _ = sharded("qwen3_moe")
    runtime = load_runtime(store, RuntimeConfig(slots_per_layer=2))
    expert_params = sum(b.gate_up.numel() + b.down.numel() for b in runtime.cache.banks.values())
    assert expert_params == 2 / 8 * runtime.store.manifest.expert_bytes / 4  # float32: 4 bytes
