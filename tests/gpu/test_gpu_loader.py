"""The CUDA loader: pinned staging ring, copies on a side stream, ordering against compute.

Every check compares slot bytes with the store's bytes after ``torch.cuda.synchronize()``, so a
copy that read a staging buffer being rewritten, or wrote a slot still being read, shows as wrong
bytes rather than as a flaky timing.
"""

from __future__ import annotations

import random

import pytest
import torch

from benchmarks.synthetic import SyntheticShape, make_synthetic_checkpoint
from expert_store.keys import ExpertKey
from expert_store.loader import ExpertLoader, SlotBank
from expert_store.runtime import RuntimeConfig, load_runtime
from expert_store.shard import shard_checkpoint
from expert_store.store import ExpertStore

pytestmark = pytest.mark.gpu

SHAPE = SyntheticShape(hidden=64, intermediate=32, num_experts=8, num_layers=2, top_k=2, vocab=128)
SLEEP_CYCLES = 500_000_000  # ~0.25 s of GPU time: far longer than any copy or host step below


@pytest.fixture(scope="module")
def bf16_store(tmp_path_factory):
    """A bfloat16 store with the synthetic checkpoint's layout (raw bytes, no dtype conversion)."""
    root = tmp_path_factory.mktemp("gpu-loader")
    shard_checkpoint(make_synthetic_checkpoint(root / "ckpt", SHAPE), root / "store")
    return root / "store"


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().cpu().contiguous().view(torch.uint8)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(_bytes(a), _bytes(b))


def _bank_for(store: ExpertStore, slots: int, dtype: torch.dtype, device: torch.device) -> SlotBank:
    layout = store.layout
    return SlotBank.allocate(slots, layout.hidden_size, layout.intermediate_size, dtype, device)


@pytest.mark.parametrize(
    ("source", "slot_dtype"),
    [("bf16", None), ("bf16", torch.float32), ("f32", torch.bfloat16)],
    ids=["raw-bf16", "bf16-to-f32", "f32-to-bf16"],
)
def test_loaded_experts_are_the_store_bytes(bf16_store, tiny_store, device, source, slot_dtype):
    # A store dtype other than the slots' is converted on the device: it must round as the CPU does.
    store = ExpertStore(bf16_store if source == "bf16" else tiny_store("qwen3_moe")[1])
    loader = ExpertLoader(device)
    layout = store.layout
    dtype = slot_dtype or store.dtype
    banks = {layer: _bank_for(store, layout.num_experts, dtype, device) for layer in layout.moe_layers}
    with loader.session():  # more experts than staging buffers between two waits
        for layer, bank in banks.items():
            for expert in range(layout.num_experts):
                loader.load(bank, expert, store.expert(ExpertKey(layer, expert)))
    assert len(layout.moe_layers) * layout.num_experts > loader.num_staging
    loader.wait()
    _synchronize(device)
    for layer, bank in banks.items():
        for expert in range(layout.num_experts):
            expected = store.expert(ExpertKey(layer, expert))
            assert _same_bytes(bank.gate_up[expert], expected.gate_up.to(dtype)), (layer, expert)
            assert _same_bytes(bank.down[expert], expected.down.to(dtype)), (layer, expert)
    store.close()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def test_staging_ring_is_pinned_and_bounded(bf16_store, device, cuda_only):
    store = ExpertStore(bf16_store)
    loader = ExpertLoader(device, num_staging=3)
    bank = _bank_for(store, 8, store.dtype, device)
    for expert in range(8):
        loader.load(bank, expert, store.expert(ExpertKey(0, expert)))
    loader.wait()
    assert len(loader._ring) == 3
    assert all(all(t.is_pinned() for t in s.parts) for s in loader._ring)
    torch.cuda.synchronize()
    assert all(_same_bytes(bank.down[e], store.expert(ExpertKey(0, e)).down) for e in range(8))
    store.close()


def test_refilling_a_slot_waits_for_the_compute_that_reads_it(bf16_store, device, cuda_only):
    store = ExpertStore(bf16_store)
    loader = ExpertLoader(device)
    bank = _bank_for(store, 1, store.dtype, device)
    first, second = store.expert(ExpertKey(0, 0)), store.expert(ExpertKey(0, 1))
    loader.load(bank, 0, first)
    loader.wait()
    torch.cuda._sleep(SLEEP_CYCLES)  # the compute stream is busy...
    seen_first = bank.gate_up[0].clone()  # ...so this read of slot 0 runs late
    loader.load(bank, 0, second)  # evict: must not overwrite slot 0 before that read
    loader.wait()
    seen_second = bank.gate_up[0].clone()
    torch.cuda.synchronize()
    assert _same_bytes(seen_first, first.gate_up)
    assert _same_bytes(seen_second, second.gate_up)
    store.close()


def test_copies_overlap_compute_queued_after_them(bf16_store, device, cuda_only):
    store = ExpertStore(bf16_store)
    loader = ExpertLoader(device)
    bank = _bank_for(store, 8, store.dtype, device)
    torch.cuda.synchronize()
    for expert in range(8):
        loader.load(bank, expert, store.expert(ExpertKey(1, expert)))
    torch.cuda._sleep(SLEEP_CYCLES)  # compute that does not need the experts yet
    loader._stream.synchronize()  # the copies finish...
    assert not torch.cuda.current_stream().query()  # ...while that compute still runs
    loader.wait()
    seen = bank.gate_up.clone()  # queued after wait: sees every expert
    torch.cuda.synchronize()
    assert all(_same_bytes(seen[e], store.expert(ExpertKey(1, e)).gate_up) for e in range(8))
    store.close()


def test_ring_follows_a_change_of_expert_shape(bf16_store, tiny_store, device, cuda_only):
    big, small = ExpertStore(bf16_store), ExpertStore(tiny_store("qwen3_moe")[1])
    loader = ExpertLoader(device)
    big_bank, small_bank = _bank_for(big, 2, big.dtype, device), _bank_for(small, 2, small.dtype, device)
    for slot in range(2):
        loader.load(big_bank, slot, big.expert(ExpertKey(0, slot)))
        loader.load(small_bank, slot, small.expert(ExpertKey(0, slot)))
    loader.wait()
    torch.cuda.synchronize()
    for slot in range(2):
        assert _same_bytes(big_bank.gate_up[slot], big.expert(ExpertKey(0, slot)).gate_up)
        assert _same_bytes(small_bank.gate_up[slot], small.expert(ExpertKey(0, slot)).gate_up)
    big.close()
    small.close()


def test_switching_selections_repeatedly_keeps_slots_exact(bf16_store, device):
    runtime = load_runtime(bf16_store, RuntimeConfig(device=str(device), slots_per_layer=4))
    layers, rng = runtime.layout.moe_layers, random.Random(0)
    for _ in range(12):  # 4 slots x 2 layers per switch against a ring of 4 staging buffers
        runtime.activate({layer: rng.sample(range(8), 4) for layer in layers}, "pruned")
    _synchronize(device)
    assert runtime.cache.stats.loads > runtime.cache.loader.num_staging
    for layer, experts in runtime.cache.resident().items():
        bank, slot_of = runtime.cache.banks[layer], runtime.cache.slots[layer].slot_of
        for expert in experts:
            source = runtime.store.expert(ExpertKey(layer, expert))
            assert _same_bytes(bank.gate_up[slot_of[expert]], source.gate_up), (layer, expert)
            assert _same_bytes(bank.down[slot_of[expert]], source.down), (layer, expert)
    runtime.close()
