"""The runtime on CUDA in float32 against the transformers reference, for every family: whole,
pruned to a subset, and in exact mode with misses loaded on demand through the pinned path."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from reference import pruned_reference
from tiny_models import FAMILIES, padded_inputs

from expert_store.runtime import RuntimeConfig, load_runtime

pytestmark = pytest.mark.gpu

TOL = 1e-4


@torch.no_grad()
def _logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).logits


def _max_diff(expected, got, mask) -> float:
    return (expected.float().cpu() - got.float().cpu())[mask.bool().cpu()].abs().max().item()


def _moe_layers(model):
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


def _on_device(runtime, device: torch.device) -> None:
    banks = runtime.cache.banks.values()
    assert all(bank.gate_up.device.type == device.type for bank in banks)
    assert all(p.device.type == device.type for p in runtime.model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch", [1, 2])
def test_all_experts_equal_reference(tiny_store, device, family, batch):
    reference, store, _ = tiny_store(family)
    runtime = load_runtime(store, RuntimeConfig(device=str(device)))
    runtime.activate_all()
    _on_device(runtime, device)
    ids, mask = padded_inputs(batch, device=device)
    assert _max_diff(_logits(reference, ids, mask), _logits(runtime.model, ids, mask), mask) <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_identical(tiny_store, device, family):
    reference, store, _ = tiny_store(family)
    runtime = load_runtime(store, RuntimeConfig(device=str(device)))
    runtime.activate_all()
    ids, mask = padded_inputs(device=device)
    kwargs = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(runtime.model.generate(ids, **kwargs), reference.generate(ids, **kwargs))


@pytest.mark.parametrize("family", FAMILIES)
def test_subset_equals_masked_reference(tiny_store, device, family):
    # The masked reference builds its masks on the CPU, so it runs on a CPU copy of the model.
    reference, store, _ = tiny_store(family)
    cpu_reference = copy.deepcopy(reference).to("cpu")
    rng = random.Random(family)
    selection = {layer: sorted(rng.sample(range(8), 5)) for layer in _moe_layers(reference)}
    runtime = load_runtime(store, RuntimeConfig(device=str(device), slots_per_layer=5))
    runtime.activate(selection, "pruned")
    ids, mask = padded_inputs(seed=1, device=device)
    got = _logits(runtime.model, ids, mask)
    with pruned_reference(cpu_reference, selection):
        expected = _logits(cpu_reference, ids.cpu(), mask.cpu())
    assert _max_diff(expected, got, mask) <= TOL
    # and the restriction matters: the unrestricted model answers differently
    assert _max_diff(_logits(reference, ids, mask), got, mask) > 1e-3
    assert runtime.cache.stats.misses == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_mode_with_half_the_slots_loads_misses_on_demand(tiny_store, device, family):
    reference, store, _ = tiny_store(family)
    runtime = load_runtime(store, RuntimeConfig(device=str(device), slots_per_layer=4))
    runtime.activate({layer: [0, 1, 2, 3] for layer in _moe_layers(reference)}, "exact")
    loads_before = runtime.cache.stats.loads
    ids, mask = padded_inputs(seed=2, device=device)
    assert _max_diff(_logits(reference, ids, mask), _logits(runtime.model, ids, mask), mask) <= TOL
    stats = runtime.cache.stats
    assert stats.misses > 0 and stats.hits > 0
    assert stats.loads > loads_before  # misses went through the loader during the forward
    assert all(len(experts) <= 4 for experts in runtime.cache.resident().values())


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_exact_mode_in_waves_reuses_slots_within_a_forward(tiny_store, device, family):
    # Two slots for a 2x12 prefill that needs nearly all 8 experts: every layer refills the slots
    # its previous wave just computed with, so a copy that overtook that compute would show here.
    reference, store, _ = tiny_store(family)
    runtime = load_runtime(store, RuntimeConfig(device=str(device), slots_per_layer=2))
    runtime.activate({}, "exact")
    ids, mask = padded_inputs(seed=3, device=device)
    for _ in range(3):
        assert _max_diff(_logits(reference, ids, mask), _logits(runtime.model, ids, mask), mask) <= TOL
    assert runtime.cache.stats.evictions > 0
    assert all(len(experts) <= 2 for experts in runtime.cache.resident().values())


def test_switching_patterns_between_forwards_stays_exact(tiny_store, device):
    reference, store, _ = tiny_store("qwen3_moe")
    layers = _moe_layers(reference)
    runtime = load_runtime(store, RuntimeConfig(device=str(device), slots_per_layer=4))
    ids, mask = padded_inputs(seed=4, device=device)
    rng = random.Random(0)
    selections = [{layer: sorted(rng.sample(range(8), 4)) for layer in layers} for _ in range(6)]
    outputs = []
    for selection in selections:  # nothing synchronises the host between a forward and the next switch
        runtime.activate(selection, "pruned")
        outputs.append(_logits(runtime.model, ids, mask))
    cpu_reference = copy.deepcopy(reference).to("cpu")
    for selection, got in zip(selections, outputs, strict=True):
        with pruned_reference(cpu_reference, selection):
            expected = _logits(cpu_reference, ids.cpu(), mask.cpu())
        assert _max_diff(expected, got, mask) <= TOL
