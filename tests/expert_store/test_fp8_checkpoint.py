"""FP8 block-quantized checkpoints as DeepSeek-V3 and the Qwen3-MoE FP8 releases ship them: a tiny
model of each family written with e4m3 weights and a float32 ``weight_scale_inv`` per 128x128 block,
sharded with its experts kept in FP8 (``float8-block128``) and its dense weights dequantized to
bfloat16, served against a transformers model loaded from the dequantized weights.

The two layouts are the same (``quantization_config`` {quant_method fp8, fmt e4m3, activation_scheme
dynamic, weight_block_size [128, 128]}; every linear weight of attention and of each expert
``model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`` in e4m3 with ``<name>_scale_inv``
[ceil(out/128), ceil(in/128)]; embeddings, norms, the router ``mlp.gate.weight`` and ``lm_head``
unquantized), so every test runs on both. DeepSeek-V3's tiny model has hidden size 160, a whole block
and a ragged one; Qwen3-MoE's is in whole blocks, as its releases are (Qwen3-30B-A3B: hidden 2048,
experts 768 wide, heads of 128), and whole blocks are what transformers' own FP8 dequantization
reads, which the Qwen3 checkpoint is checked against."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from reference import pruned_reference
from safetensors.torch import load_file, save_file
from tiny_models import padded_inputs, spread_routers, tiny_config
from transformers import AutoModelForCausalLM
from transformers.integrations.finegrained_fp8 import Fp8Dequantize

from expert_store.errors import CheckpointError
from expert_store.keys import ExpertKey
from expert_store.manifest import Manifest
from expert_store.runtime import RuntimeConfig, load_runtime
from expert_store.shard import shard_checkpoint
from expert_store.store import ExpertStore, verify_store
from server.cli import main

BLOCK = 128
QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [BLOCK, BLOCK],
}
# taer (float32 compute) against the transformers model holding the same dequantized weights in
# float32: they differ only in the order of floating-point operations, as for full-precision stores.
TOL = 1e-5
_UNQUANTIZED = ("embed_tokens", "lm_head", "mlp.gate.weight", "norm")  # as both families ship them
FAMILIES = ("deepseek_v3", "qwen3_moe")
# Each family's tiny model in 128 blocks, on top of tests/tiny_models.py's config.
_SHAPES = {
    # hidden: one whole 128 block, one ragged block of 32; the dense first layer's MLP ragged too
    "deepseek_v3": {"hidden_size": 160, "intermediate_size": 200},
    # every weight in whole blocks: q and o [256, 256], k and v [128, 256]
    "qwen3_moe": {"hidden_size": 256, "head_dim": 64, "num_attention_heads": 4, "num_key_value_heads": 2},
}


def _tiny_fp8_model(family: str, moe_intermediate: int) -> torch.nn.Module:
    config = tiny_config(family)
    for name, value in _SHAPES[family].items():
        setattr(config, name, value)
    config.moe_intermediate_size = moe_intermediate
    torch.manual_seed(0)
    return spread_routers(AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval())


def _quantize_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 [R, C], float32 scale_inv [ceil(R/B), ceil(C/B)]), as DeepSeek-V3's are made."""
    rows, cols = weight.shape
    padded = F.pad(weight, (0, -cols % BLOCK, 0, -rows % BLOCK))
    grid = padded.view(padded.shape[0] // BLOCK, BLOCK, padded.shape[1] // BLOCK, BLOCK)
    scale_inv = grid.abs().amax(dim=(1, 3)) / 448  # [R/B, C/B]
    q = (weight / _expand(scale_inv, rows, cols)).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, scale_inv


def _expand(scale_inv: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return torch.kron(scale_inv, torch.ones(BLOCK, BLOCK))[:rows, :cols]  # [R, C]


def _dequantize(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    return q.to(torch.float32) * _expand(scale_inv, *q.shape)


def _is_quantized(name: str, tensor: torch.Tensor) -> bool:
    return tensor.ndim == 2 and name.endswith(".weight") and not any(p in name for p in _UNQUANTIZED)


def _write_fp8_checkpoint(root, family: str, moe_intermediate: int = BLOCK):
    """(original float32 model, FP8 checkpoint dir, directory of the dequantized float32 weights)."""
    model = _tiny_fp8_model(family, moe_intermediate)
    model.save_pretrained(root / "full")
    fp8, dequantized = {}, {}
    for name, tensor in load_file(str(root / "full" / "model.safetensors")).items():
        if _is_quantized(name, tensor):
            q, scale_inv = _quantize_blocks(tensor)
            fp8[name], fp8[f"{name}_scale_inv"] = q, scale_inv
            value = _dequantize(q, scale_inv)
            # dense weights become bfloat16 in the store; experts are dequantized at run time
            dequantized[name] = value if ".experts." in name else value.to(torch.bfloat16).float()
        else:
            keep = tensor if name.endswith("e_score_correction_bias") else tensor.to(torch.bfloat16)
            fp8[name], dequantized[name] = keep, keep.float()
    assert any(".experts.3.down_proj.weight_scale_inv" in name for name in fp8)
    config = json.loads((root / "full" / "config.json").read_text())
    for directory, tensors, extra in (
        (root / "ckpt", fp8, {"quantization_config": QUANTIZATION_CONFIG, "dtype": "bfloat16"}),
        (root / "dequantized", dequantized, {}),
    ):
        directory.mkdir()
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps(config | extra))
        shutil.copy(root / "full" / "generation_config.json", directory)
    return model, root / "ckpt", root / "dequantized"


@pytest.fixture(scope="module", params=FAMILIES)
def fp8_store(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"fp8-{request.param}")
    model, checkpoint, dequantized = _write_fp8_checkpoint(root, request.param)
    assert main(["shard", str(checkpoint), str(root / "store")]) == 0
    return model, checkpoint, dequantized, root / "store"


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_experts_stay_fp8_with_their_block_scales(fp8_store):
    _, checkpoint, _, store_dir = fp8_store
    manifest = Manifest.load(store_dir)
    assert (manifest.format_version, manifest.expert_scheme, manifest.dtype) == (2, "float8-block128", "BF16")
    assert "quantization_config" not in json.loads((store_dir / "config.json").read_text())
    source = load_file(str(checkpoint / "model.safetensors"))
    store = ExpertStore(store_dir)
    stored = store.expert(ExpertKey(2, 3))
    prefix = "model.layers.2.mlp.experts.3"
    gate, up, down = (f"{prefix}.{p}_proj.weight" for p in ("gate", "up", "down"))
    hidden_blocks = -(-store.layout.hidden_size // BLOCK)  # DeepSeek-V3's 160: 2, Qwen3's 256: 2
    assert stored.gate_up.dtype == torch.float8_e4m3fn and stored.gate_up_scale.shape == (2, hidden_blocks)
    assert stored.down_scale.shape == (hidden_blocks, 1)  # [ceil(hidden/128), 128/128]
    expected_gate_up = torch.cat([source[gate], source[up]]).view(torch.uint8)
    assert torch.equal(stored.gate_up.view(torch.uint8), expected_gate_up)  # the checkpoint's bytes
    assert torch.equal(stored.down.view(torch.uint8), source[down].view(torch.uint8))
    expected_scale = torch.cat([source[f"{gate}_scale_inv"], source[f"{up}_scale_inv"]])
    assert torch.equal(stored.gate_up_scale, expected_scale)
    assert torch.equal(stored.down_scale, source[f"{down}_scale_inv"])
    bf16_bytes = 2 * store.layout.params_per_expert
    assert manifest.bytes_per_expert <= 0.51 * bf16_bytes  # 8 bits plus 6 float32 block scales
    dense = dict(store.dense_tensors())
    quantized = [
        n.removesuffix("_scale_inv") for n in source if n.endswith("_scale_inv") and ".experts." not in n
    ]
    assert "model.layers.0.self_attn.o_proj.weight" in quantized
    for name in quantized:  # dense weights (attention, DeepSeek-V3's dense and shared MLPs) in bfloat16
        expected = _dequantize(source[name], source[f"{name}_scale_inv"]).to(torch.bfloat16)
        assert torch.equal(dense[name], expected), name
    for name in ("model.layers.1.mlp.gate.weight", "model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(dense[name], source[name])  # the router and the rest: as the checkpoint has them
    assert not any(name.endswith("_scale_inv") for name in dense)
    store.close()
    assert verify_store(store_dir).ok


def test_logits_equal_the_dequantized_reference(fp8_store):
    original, _, dequantized, store_dir = fp8_store
    reference = AutoModelForCausalLM.from_pretrained(dequantized, dtype=torch.float32).eval()
    runtime = load_runtime(store_dir, RuntimeConfig(dtype="float32"))
    runtime.activate_all()
    assert runtime.expert_dtype == "float8-block128"
    assert all(bank.gate_up.dtype == torch.float8_e4m3fn for bank in runtime.cache.banks.values())
    ids, mask = padded_inputs(2)
    got = _logits(runtime.model, ids, mask)
    assert (_logits(reference, ids, mask) - got)[mask.bool()].abs().max().item() <= TOL
    # and FP8 (every linear weight, attention included) stays near the float32 original: a sanity
    # bound, not the method's tolerance (measured: mean difference 0.03 and 0.02, logits' spread 0.25
    # and 0.34, for DeepSeek-V3 and Qwen3)
    original_logits = _logits(original, ids, mask)[mask.bool()]
    assert (original_logits - got[mask.bool()]).abs().mean() < original_logits.std() / 5
    runtime.close()

    pruned = load_runtime(store_dir, RuntimeConfig(slots_per_layer=5, dtype="float32"))
    kept = ([0, 2, 3, 5, 7], [1, 2, 4, 6, 7], [0, 1, 3, 4, 6])  # DeepSeek-V3: layers 1-2, Qwen3: 0-2
    selection = dict(zip(pruned.layout.moe_layers, kept, strict=False))
    pruned.activate(selection, "pruned")
    with pruned_reference(reference, selection):
        expected = _logits(reference, ids, mask)
    assert (expected - _logits(pruned.model, ids, mask))[mask.bool()].abs().max().item() <= TOL
    pruned.close()


def test_a_flipped_scale_byte_is_caught_by_verify(fp8_store, tmp_path, capsys):
    copy = tmp_path / "store"
    shutil.copytree(fp8_store[3], copy)
    entry = Manifest.load(copy).experts[ExpertKey(2, 6)]
    path = copy / entry.file
    data = bytearray(path.read_bytes())
    data[entry.gate_up_scale[0] + 5] ^= 0x01  # a block scale's mantissa: a plausible, wrong float
    path.write_bytes(bytes(data))
    assert main(["verify", str(copy)]) == 1
    assert "layer 2, expert 6" in capsys.readouterr().err


def test_bfloat16_experts_are_the_dequantized_blocks(fp8_store, tmp_path):
    _, checkpoint, _, _ = fp8_store
    shard_checkpoint(checkpoint, tmp_path / "store", expert_dtype="bfloat16")
    manifest = Manifest.load(tmp_path / "store")
    assert (manifest.expert_scheme, manifest.dtype) == ("none", "BF16")
    source = load_file(str(checkpoint / "model.safetensors"))
    down = "model.layers.1.mlp.experts.4.down_proj.weight"
    store = ExpertStore(tmp_path / "store")
    expected = _dequantize(source[down], source[f"{down}_scale_inv"]).to(torch.bfloat16)
    assert torch.equal(store.expert(ExpertKey(1, 4)).down, expected)
    store.close()


def test_the_qwen3_checkpoint_is_what_transformers_dequantizes(tmp_path):
    """The reference above dequantizes the checkpoint as this test reads the layout; transformers' own
    FP8 integration (what loads the Qwen3 FP8 releases with ``dequantize=True``) reads every
    quantized weight of the tiny Qwen3 checkpoint to exactly the same values."""
    _, checkpoint, _ = _write_fp8_checkpoint(tmp_path, "qwen3_moe")
    source = load_file(str(checkpoint / "model.safetensors"))
    scaled = [name.removesuffix("_scale_inv") for name in source if name.endswith("_scale_inv")]
    assert len(scaled) == 3 * (4 + 3 * 8)  # per layer: q, k, v, o and 8 experts' gate, up, down
    assert not any(p in name for name in scaled for p in _UNQUANTIZED)
    dequantize = Fp8Dequantize(hf_quantizer=None)
    for name in scaled:
        weight, scale_inv = source[name], source[f"{name}_scale_inv"]
        assert weight.dtype == torch.float8_e4m3fn and scale_inv.dtype == torch.float32
        read = dequantize.convert({"weight": weight, "weight_scale_inv": scale_inv})["weight"]
        assert torch.equal(read, _dequantize(weight, scale_inv)), name


def test_ragged_expert_rows_cannot_keep_their_blocks(tmp_path):
    _, checkpoint, _ = _write_fp8_checkpoint(tmp_path, "deepseek_v3", moe_intermediate=64)
    with pytest.raises(CheckpointError, match="intermediate size 64 is not a multiple of its 128-row"):
        shard_checkpoint(checkpoint, tmp_path / "store")
    shard_checkpoint(checkpoint, tmp_path / "store", expert_dtype="int8")  # dequantized, then int8
    assert Manifest.load(tmp_path / "store").expert_scheme == "int8-channel"
    assert verify_store(tmp_path / "store").ok
