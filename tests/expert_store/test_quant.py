"""8-bit experts: quantization round trips, stores of int8/float8 experts served against a transformers
reference holding the same dequantized weights, checksums over scales, scheme checks, refusals."""

from __future__ import annotations

import json
import random
import re
import shutil

import pytest
import torch
from reference import dequantized_reference, pruned_reference
from tiny_models import FAMILIES, padded_inputs, save_tiny

from expert_store.errors import CheckpointError, CorruptExpertError, StoreError
from expert_store.keys import ExpertKey
from expert_store.manifest import Manifest
from expert_store.quant import SCHEMES
from expert_store.runtime import RuntimeConfig, load_runtime
from expert_store.shard import shard_checkpoint
from expert_store.store import ExpertStore, verify_store
from server.cli import main

# taer's logits against the transformers model holding the same dequantized expert weights (float32):
# the two differ only in the order of floating-point operations, as for full-precision stores.
TOL = 1e-5
EIGHT_BIT = {"int8": "int8-channel", "float8": "float8-channel"}


def _weights() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 48, generator=generator) * torch.logspace(-3, 1, 64)[:, None]  # [R, C]
    weight[5] = 0  # an all-zero row
    weight[7, 3] = 40.0  # an outlier: its row's scale grows, the other rows' do not
    return weight


def test_int8_round_trip_is_within_half_a_step_per_row():
    scheme, weight = SCHEMES["int8-channel"], _weights()
    q, scale = scheme.quantize(weight)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (64,)
    back = scheme.dequantize(q, scale, torch.float32)
    assert ((back - weight).abs() <= scale[:, None] / 2 * (1 + 1e-5)).all()
    nonzero = weight.abs().amax(dim=1) > 0
    assert (q.abs().amax(dim=1)[nonzero] == 127).all()  # each row uses the whole range
    assert torch.equal(back[5], torch.zeros(48))


def test_float8_round_trip_is_within_half_an_e4m3_step():
    scheme, weight = SCHEMES["float8-channel"], _weights()
    q, scale = scheme.quantize(weight)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64,)
    back = scheme.dequantize(q, scale, torch.float32)
    # e4m3 keeps 3 mantissa bits (half a step: 2^-4 relative); below 2^-6 its steps are 2^-9 apart
    bound = 2**-4 * weight.abs() + scale[:, None] * 2**-10 + 1e-6 * weight.abs()
    assert ((back - weight).abs() <= bound).all()
    assert torch.equal(
        q.to(torch.float32).abs().amax(dim=1)[weight.abs().amax(dim=1) > 0], torch.full((63,), 448.0)
    )
    assert torch.equal(back[5], torch.zeros(48))
    assert scheme.dequantize(q, scale, torch.bfloat16).dtype == torch.bfloat16


def test_float8_values_are_looked_up_exactly_as_converted():
    every_byte = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    scale = torch.ones(1)
    looked_up = SCHEMES["float8-channel"].dequantize(every_byte[None], scale, torch.float32)[0]
    converted = every_byte.to(torch.float32)
    assert torch.equal(looked_up.isnan(), converted.isnan())  # the two NaN bytes
    assert torch.equal(looked_up[~converted.isnan()], converted[~converted.isnan()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme_name", ["int8-channel", "float8-channel"])
def test_the_8_bit_product_equals_the_dequantized_one(scheme_name, dtype):
    """int8 x bfloat16 on the CPU runs torch's weight-only int8 kernel; it must agree with
    dequantize-then-multiply within bfloat16's rounding (the scale is rounded to bfloat16 too)."""
    scheme, weight = SCHEMES[scheme_name], _weights()
    q, scale = scheme.quantize(weight)
    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = scheme.linear(x, q, scale)
    want = torch.nn.functional.linear(x.float(), scheme.dequantize(q, scale, torch.float32))
    assert got.dtype == dtype and got.shape == (5, 64)
    tolerance = 1e-5 if dtype == torch.float32 else 2**-6  # bfloat16: 8 bits of mantissa, a few roundings
    assert ((got.float() - want).abs() <= tolerance * want.abs().amax(dim=0, keepdim=True) + 1e-6).all()


@pytest.mark.parametrize("expert_dtype", sorted(EIGHT_BIT))
def test_store_holds_the_quantized_experts_and_their_scales(sharded, expert_dtype):
    reference, store_dir, _ = sharded("qwen3_moe", expert_dtype=expert_dtype)
    scheme = SCHEMES[EIGHT_BIT[expert_dtype]]
    raw = json.loads((store_dir / "manifest.json").read_text())
    assert raw["format_version"] == 2 and raw["expert_scheme"] == scheme.name and raw["dtype"] == "F32"
    assert all(item["scheme"] == scheme.name for items in raw["experts"].values() for item in items)
    store = ExpertStore(store_dir)
    layout = store.layout
    weight_bytes = layout.params_per_expert
    scale_bytes = 4 * (2 * layout.intermediate_size + layout.hidden_size)
    assert store.manifest.bytes_per_expert == weight_bytes + scale_bytes
    for key in store.manifest.experts:
        experts = reference.model.layers[key.layer].mlp.experts
        stored = store.expert(key)
        for weight, scale, original in (
            (stored.gate_up, stored.gate_up_scale, experts.gate_up_proj[key.expert]),
            (stored.down, stored.down_scale, experts.down_proj[key.expert]),
        ):
            expected_q, expected_scale = scheme.quantize(original.detach())
            assert weight.dtype == scheme.weight_dtype
            assert torch.equal(weight.view(torch.uint8), expected_q.view(torch.uint8))  # bit-exact bytes
            assert torch.equal(scale, expected_scale)
    assert verify_store(store_dir).ok
    store.close()


def test_bfloat16_experts_are_cast_without_scales(sharded):
    reference, store_dir, _ = sharded("olmoe", expert_dtype="bfloat16")
    manifest = Manifest.load(store_dir)
    assert (manifest.format_version, manifest.expert_scheme, manifest.dtype) == (1, "none", "BF16")
    store = ExpertStore(store_dir)
    stored = store.expert(ExpertKey(1, 2))
    assert stored.gate_up_scale is None and stored.gate_up.dtype == torch.bfloat16
    original = reference.model.layers[1].mlp.experts.gate_up_proj[2].detach()
    assert torch.equal(stored.gate_up, original.to(torch.bfloat16))
    store.close()


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("expert_dtype", sorted(EIGHT_BIT))
@pytest.mark.parametrize("family", FAMILIES)
def test_all_experts_equal_the_dequantized_reference(sharded, family, expert_dtype):
    model, store_dir, _ = sharded(family, expert_dtype=expert_dtype)
    runtime = load_runtime(store_dir)
    runtime.activate_all()
    assert runtime.expert_dtype == EIGHT_BIT[expert_dtype]
    assert all(
        bank.gate_up.dtype == SCHEMES[EIGHT_BIT[expert_dtype]].weight_dtype
        for bank in runtime.cache.banks.values()
    )
    reference = dequantized_reference(model, runtime.store)
    ids, mask = padded_inputs(2)
    got = _logits(runtime.model, ids, mask)
    assert (_logits(reference, ids, mask) - got)[mask.bool()].abs().max().item() <= TOL
    # and the 8-bit model stays near the original (not a tolerance of the method, a sanity bound)
    assert (_logits(model, ids, mask) - got)[mask.bool()].abs().max().item() < 0.05
    runtime.close()


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_pruned_and_exact_modes_on_an_int8_store(sharded, family):
    model, store_dir, _ = sharded(family, expert_dtype="int8")
    store = ExpertStore(store_dir)
    reference = dequantized_reference(model, store)
    store.close()
    moe_layers = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    rng = random.Random(family)
    selection = {layer: sorted(rng.sample(range(8), 5)) for layer in moe_layers}
    ids, mask = padded_inputs(2, seed=1)

    pruned = load_runtime(store_dir, RuntimeConfig(slots_per_layer=5))
    pruned.activate(selection, "pruned")
    with pruned_reference(reference, selection):
        expected = _logits(reference, ids, mask)
    assert (expected - _logits(pruned.model, ids, mask))[mask.bool()].abs().max().item() <= TOL
    pruned.close()

    exact = load_runtime(store_dir, RuntimeConfig(slots_per_layer=3))  # misses load in waves
    exact.activate(selection, "exact")
    expected = _logits(reference, ids, mask)
    assert (expected - _logits(exact.model, ids, mask))[mask.bool()].abs().max().item() <= TOL
    assert exact.cache.stats.loads > 3 * len(moe_layers)
    exact.close()


def test_a_flipped_scale_byte_is_caught_by_verify_and_by_loading(sharded, tmp_path, capsys):
    _, store_dir, _ = sharded("qwen3_moe", expert_dtype="int8")
    copy = tmp_path / "store"
    shutil.copytree(store_dir, copy)
    entry = Manifest.load(copy).experts[ExpertKey(1, 5)]
    path = copy / entry.file
    data = bytearray(path.read_bytes())
    data[entry.down_scale[0] + 2] ^= 0x01  # a scale's mantissa: a plausible, wrong float
    path.write_bytes(bytes(data))

    report = verify_store(copy)
    assert any("layer-001.safetensors" in p and "expert (layer 1, expert 5)" in p for p in report.problems)
    assert main(["verify", str(copy)]) == 1
    assert "layer 1, expert 5" in capsys.readouterr().err

    runtime = load_runtime(copy, RuntimeConfig(slots_per_layer=4))
    try:
        assert runtime.store.can_read_into(*runtime.cache.banks[1].parts(0))  # the direct read path
        with pytest.raises(CorruptExpertError, match=r"layer 1, expert 5\) in .*layer-001.safetensors"):
            runtime.cache.prefetch({1: [4, 5]})
        assert 5 not in runtime.cache.resident()[1]
    finally:
        runtime.close()
    with pytest.raises(CorruptExpertError, match=r"layer 1, expert 5\)"):
        ExpertStore(copy).expert(ExpertKey(1, 5))


def _rewrite_manifest(store_dir, change) -> None:
    path = store_dir / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _set_scheme(name: str, version: int):
    def change(data: dict) -> None:
        data["format_version"], data["expert_scheme"] = version, name
        for items in data["experts"].values():
            for item in items:
                item["scheme"] = name

    return change


def test_a_store_of_one_scheme_never_loads_as_another(sharded, tmp_path):
    _, store_dir, _ = sharded("qwen3_moe", expert_dtype="int8")

    relabelled = tmp_path / "relabelled"  # the manifest says float8: the files' own headers say int8
    shutil.copytree(store_dir, relabelled)
    _rewrite_manifest(relabelled, _set_scheme("float8-channel", 2))
    with pytest.raises(
        StoreError, match=r"holds \d+\.\w+ as I8 but the manifest says experts are 'float8-channel'"
    ):
        ExpertStore(relabelled)

    as_version_1 = tmp_path / "v1"  # a version-1 manifest whose experts have scales
    shutil.copytree(store_dir, as_version_1)
    _rewrite_manifest(as_version_1, lambda data: data.update(format_version=1, expert_scheme="none"))
    with pytest.raises(
        StoreError, match=r"malformed .*stored as 'int8-channel' \(with scales\) in a store of 'none'"
    ):
        ExpertStore(as_version_1)

    unknown = tmp_path / "unknown"
    shutil.copytree(store_dir, unknown)
    _rewrite_manifest(unknown, _set_scheme("int4-group", 2))
    with pytest.raises(StoreError, match="scheme 'int4-group', which this taer does not read"):
        ExpertStore(unknown)

    _, full_dir, _ = sharded("qwen3_moe")
    claims_int8 = tmp_path / "claims-int8"  # full-precision experts whose manifest claims int8
    shutil.copytree(full_dir, claims_int8)
    _rewrite_manifest(claims_int8, lambda data: data.update(format_version=2))
    with pytest.raises(StoreError, match="format version 2 with expert scheme 'none'"):
        ExpertStore(claims_int8)


QUANTIZED_CHECKPOINTS = [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "GPTQ"),
    ({"quant_method": "awq", "bits": 4, "version": "gemm"}, "AWQ"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes 4-bit"),
    ({"quant_method": "mxfp4"}, "MXFP4"),
    ({"quant_method": "fp8", "fmt": "e4m3"}, "FP8 without weight_block_size"),
    ({"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [64, 64]}, "FP8 with 64x64 block scales"),
    (
        {"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]},
        "FP8 with 128x128 block scales (e4m3, static activations)",
    ),
]  # FP8 e4m3 with 128x128 block scales and dynamic activations is read: test_fp8_checkpoint.py


@pytest.mark.parametrize(("quantization_config", "label"), QUANTIZED_CHECKPOINTS)
def test_quantized_checkpoints_are_refused_in_one_line(tmp_path, capsys, quantization_config, label):
    checkpoint = tmp_path / "ckpt"
    save_tiny("qwen3_moe", checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"quantized with {re.escape(label)} .*--expert-dtype int8"):
        shard_checkpoint(checkpoint, tmp_path / "store")
    capsys.readouterr()
    assert main(["shard", str(checkpoint), str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and label in err[0] and repr(quantization_config["quant_method"]) in err[0]
    assert not (tmp_path / "store").exists()


def test_taer_shard_expert_dtype_flag(tmp_path, capsys):
    save_tiny("mixtral", tmp_path / "ckpt")
    assert main(["shard", str(tmp_path / "ckpt"), str(tmp_path / "store"), "--expert-dtype", "float8"]) == 0
    assert "float8-channel" in capsys.readouterr().out
    assert Manifest.load(tmp_path / "store").expert_scheme == "float8-channel"
    assert main(["verify", str(tmp_path / "store")]) == 0
    with pytest.raises(CheckpointError, match="unknown expert dtype 'int4'; use one of source, bfloat16"):
        shard_checkpoint(tmp_path / "ckpt", tmp_path / "other", expert_dtype="int4")
