"""bfloat16 on CUDA: the runtime against transformers loading the same checkpoint in bfloat16.

Tolerance: the two compute the same kernels in the same order, so logits agree to within a few
bfloat16 roundings; 2e-2 on logits of magnitude ~0.5 (bf16 spacing there: 2**-9 ~ 0.002) allows
about ten. Greedy generation must pick the same tokens.
"""

from __future__ import annotations

import random

import pytest
import torch
from tiny_models import FAMILIES, padded_inputs
from transformers import AutoModelForCausalLM

from expert_store.runtime import RuntimeConfig, load_runtime

pytestmark = pytest.mark.gpu

BF16_TOL = 2e-2


@pytest.fixture(scope="module")
def bf16_reference(tiny_store, device):
    built = {}

    def get(family: str):
        if family not in built:
            _, _, ckpt = tiny_store(family)
            model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
            built[family] = model.to(device).eval()
        return built[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_logits_and_greedy_tokens_match_reference(tiny_store, bf16_reference, device, family):
    _, store, _ = tiny_store(family)
    reference = bf16_reference(family)
    runtime = load_runtime(store, RuntimeConfig(device=str(device), dtype="bfloat16"))
    runtime.activate_all()
    assert all(bank.gate_up.dtype == torch.bfloat16 for bank in runtime.cache.banks.values())
    ids, mask = padded_inputs(device=device)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits.float()
        got = runtime.model(input_ids=ids, attention_mask=mask).logits.float()
    assert got.isfinite().all()
    assert (expected - got)[mask.bool()].abs().max().item() <= BF16_TOL
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(runtime.model.generate(ids, **kwargs), reference.generate(ids, **kwargs))


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_bf16_exact_mode_with_misses_matches_reference_and_pruned_runs(
    tiny_store, bf16_reference, device, family
):
    _, store, _ = tiny_store(family)
    runtime = load_runtime(store, RuntimeConfig(device=str(device), dtype="bfloat16", slots_per_layer=4))
    layers = runtime.layout.moe_layers
    ids, mask = padded_inputs(seed=1, device=device)
    runtime.activate({layer: [0, 1] for layer in layers}, "exact")
    with torch.no_grad():
        exact = runtime.model(input_ids=ids, attention_mask=mask).logits.float()
        expected = bf16_reference(family)(input_ids=ids, attention_mask=mask).logits.float()
    assert runtime.cache.stats.misses > 0
    assert (expected - exact)[mask.bool()].abs().max().item() <= BF16_TOL
    rng = random.Random(family)
    runtime.activate({layer: sorted(rng.sample(range(8), 4)) for layer in layers}, "pruned")
    misses = runtime.cache.stats.misses
    with torch.no_grad():
        pruned = runtime.model(input_ids=ids, attention_mask=mask).logits
    assert runtime.cache.stats.misses == misses
    assert pruned.dtype == torch.bfloat16 and pruned.isfinite().all()
