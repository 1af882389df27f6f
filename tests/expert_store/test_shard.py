"""Sharding real checkpoint layouts, checksums, and every kind of bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from tiny_models import FAMILIES, save_tiny, tiny_config

from expert_store.errors import (
    CheckpointError,
    CorruptExpertError,
    StoreError,
    StoreExistsError,
    UnsupportedFamilyError,
)
from expert_store.keys import ExpertKey
from expert_store.manifest import Manifest
from expert_store.shard import shard_checkpoint
from expert_store.store import ExpertStore, verify_store
from server.cli import main


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_experts_round_trip_bit_exact(sharded, family, fused):
    reference, store_dir, _ = sharded(family, fused)
    store = ExpertStore(store_dir)
    manifest = store.manifest
    assert manifest.family == family
    for key in manifest.experts:
        experts = reference.model.layers[key.layer].mlp.experts
        tensors = store.expert(key)
        assert torch.equal(tensors.gate_up, experts.gate_up_proj[key.expert])
        assert torch.equal(tensors.down, experts.down_proj[key.expert])
    dense = dict(store.dense_tensors())
    assert not any(".experts." in name for name in dense)
    assert torch.equal(dense["model.embed_tokens.weight"], reference.model.embed_tokens.weight)
    assert verify_store(store_dir).ok


def test_store_layout_and_side_files(sharded):
    _, store_dir, _ = sharded("mixtral")
    manifest = Manifest.load(store_dir)
    assert (store_dir / "config.json").exists() and (store_dir / "generation_config.json").exists()
    assert [entry.path for entry in manifest.expert_files] == [
        f"experts/layer-{i:03d}.safetensors" for i in range(3)
    ]
    with safe_open(str(store_dir / "experts/layer-001.safetensors"), "pt") as handle:
        assert sorted(handle.keys())[:2] == ["0.down_proj", "0.gate_up_proj"]
    # mixtral's block_sparse_moe names were renamed to transformers 5 module names
    with safe_open(str(store_dir / manifest.dense_files[0].path), "pt") as handle:
        assert "model.layers.0.mlp.gate.weight" in handle.keys()
    assert not list(store_dir.parent.glob(".store.partial-*"))


def test_sharded_checkpoint_with_index(tmp_path):
    model = save_tiny("qwen3_moe", tmp_path / "ckpt")
    model.save_pretrained(tmp_path / "multi", max_shard_size="20KB")
    assert (tmp_path / "multi" / "model.safetensors.index.json").exists()
    manifest = shard_checkpoint(tmp_path / "multi", tmp_path / "store", dense_shard_bytes=4096)
    assert len(manifest.dense_files) > 1
    assert torch.equal(
        ExpertStore(tmp_path / "store").expert(ExpertKey(2, 7)).down,
        model.model.layers[2].mlp.experts.down_proj[7],
    )


def test_flipped_byte_is_caught_by_verify_and_by_loading(sharded, tmp_path, capsys):
    _, store_dir, _ = sharded("qwen3_moe")
    copy = tmp_path / "store"
    shutil.copytree(store_dir, copy)
    entry = Manifest.load(copy).experts[ExpertKey(1, 5)]
    path = copy / entry.file
    data = bytearray(path.read_bytes())
    data[entry.down[0] + 3] ^= 0xFF
    path.write_bytes(bytes(data))

    report = verify_store(copy)
    assert not report.ok
    assert any("layer-001.safetensors" in p and "layer 1, expert 5" in p for p in report.problems)
    assert main(["verify", str(copy)]) == 1
    assert "layer 1, expert 5" in capsys.readouterr().err

    store = ExpertStore(copy)
    store.expert(ExpertKey(1, 4))  # a neighbour is fine
    with pytest.raises(CorruptExpertError, match=r"layer 1, expert 5\) in .*layer-001.safetensors"):
        store.expert(ExpertKey(1, 5))


def test_missing_store_shard_is_a_clear_error(sharded, tmp_path):
    _, store_dir, _ = sharded("qwen3_moe")
    copy = tmp_path / "store"
    shutil.copytree(store_dir, copy)
    (copy / "experts/layer-002.safetensors").unlink()
    with pytest.raises(StoreError, match="layer-002.safetensors is missing"):
        ExpertStore(copy)


def test_bad_inputs(tmp_path, capsys):
    with pytest.raises(CheckpointError, match="not a directory"):
        shard_checkpoint(tmp_path / "nope", tmp_path / "out")

    pickle_only = tmp_path / "bin"
    pickle_only.mkdir()
    tiny_config("qwen3_moe").save_pretrained(pickle_only)
    (pickle_only / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="pickle"):
        shard_checkpoint(pickle_only, tmp_path / "out")

    unknown = tmp_path / "unknown"
    save_tiny("qwen3_moe", unknown)
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(
        json.dumps({**config, "model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    )
    with pytest.raises(UnsupportedFamilyError, match="supported: deepseek_v3, mixtral"):
        shard_checkpoint(unknown, tmp_path / "out")

    dense = tmp_path / "dense"
    save_tiny("qwen3_moe", dense)
    config = json.loads((dense / "config.json").read_text())
    (dense / "config.json").write_text(json.dumps({**config, "mlp_only_layers": [0, 1, 2]}))
    with pytest.raises(CheckpointError, match="not an MoE model"):
        shard_checkpoint(dense, tmp_path / "out")

    model = save_tiny("qwen3_moe", tmp_path / "ok")
    model.save_pretrained(tmp_path / "multi", max_shard_size="20KB")
    shards = sorted((tmp_path / "multi").glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=f"missing .*{shards[-1].name}"):
        shard_checkpoint(tmp_path / "multi", tmp_path / "out")

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("user data")
    with pytest.raises(StoreExistsError, match="--force"):
        shard_checkpoint(tmp_path / "ok", tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "user data"
    shard_checkpoint(tmp_path / "ok", tmp_path / "full", force=True)
    assert (tmp_path / "full" / "manifest.json").exists() and not (tmp_path / "full" / "keep.txt").exists()

    capsys.readouterr()
    assert main(["shard", str(tmp_path / "nope"), str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a directory" in err[0]


def test_interrupted_shard_leaves_nothing_that_looks_valid(tmp_path, monkeypatch):
    save_tiny("olmoe", tmp_path / "ckpt")
    import expert_store.shard as shard_module

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shard_module, "_write_layer", explode)
    with pytest.raises(KeyboardInterrupt):
        shard_checkpoint(tmp_path / "ckpt", tmp_path / "store")
    assert not (tmp_path / "store").exists()
    assert not list(tmp_path.glob(".store*"))


def test_read_into_equals_the_mapped_view(sharded):
    _, store_dir, _ = sharded("qwen3_moe")
    store = ExpertStore(store_dir, verify="always")
    expected = store.expert(ExpertKey(2, 3))
    gate_up, down = torch.empty_like(expected.gate_up), torch.empty_like(expected.down)
    assert store.can_read_into(gate_up, down) and not store.can_read_into(gate_up.to(torch.float64), down)
    assert not store.can_read_into(gate_up)  # every part of the expert, or none
    store.read_into(ExpertKey(2, 3), gate_up, down)
    assert torch.equal(gate_up, expected.gate_up) and torch.equal(down, expected.down)
    store.close()


def test_a_corrupt_expert_loaded_into_a_slot_leaves_the_slot_free(sharded, tmp_path):
    from expert_store.runtime import RuntimeConfig, load_runtime

    _, store_dir, _ = sharded("qwen3_moe")
    copy = tmp_path / "store"
    shutil.copytree(store_dir, copy)
    entry = Manifest.load(copy).experts[ExpertKey(1, 5)]
    data = bytearray((copy / entry.file).read_bytes())
    data[entry.gate_up[0] + 11] ^= 0x01
    (copy / entry.file).write_bytes(bytes(data))
    runtime = load_runtime(copy, RuntimeConfig(slots_per_layer=4))
    try:
        assert runtime.cache.store.can_read_into(*runtime.cache.banks[1].parts(0))  # the direct read path
        with pytest.raises(CorruptExpertError, match=r"layer 1, expert 5\) in .*layer-001.safetensors"):
            runtime.cache.prefetch({1: [4, 5]})
        assert 5 not in runtime.cache.resident()[1]  # never claimed by a slot holding bad bytes
        runtime.cache.prefetch({1: [4, 6]})  # the layer goes on working
        assert runtime.cache.resident()[1] == [4, 6]
    finally:
        runtime.close()
