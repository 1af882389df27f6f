"""FP8 block-quantized checkpoints (DeepSeek-V3's layout) as ``taer shard`` reads them.

Each quantized linear weight is float8 e4m3 with a float32 ``<name>_scale_inv`` [ceil(out/128),
ceil(in/128)]; the weight is ``q * scale_inv`` over 128x128 blocks (scheme ``float8-block128``).
Routed experts keep those bytes and scales (no dequantized copy on disk); dense weights are
dequantized to bfloat16, since the runtime's dense modules are the family's plain transformers
modules.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from expert_store.checkpoint import CheckpointFiles
from expert_store.errors import CheckpointError
from expert_store.quant import Scheme, checkpoint_scale_name
from expert_store.safetensors_file import DTYPE_NAMES

# What an FP8 checkpoint's weights are dequantized to: its dense weights always, its experts unless
# they are kept as stored (`--expert-dtype source`). DeepSeek-V3's unquantized tensors are bfloat16.
DEQUANTIZED_DTYPE = torch.bfloat16


def check_fp8_experts(has_fused: bool, intermediate_size: int, block: int, keeps_blocks: bool) -> None:
    """What an FP8 checkpoint must be for its experts to shard: per-expert tensors (DeepSeek-V3's
    layout), and, to keep the block scales, gate and up rows that end on a block boundary, since they
    are stacked into one ``gate_up_proj`` with one block grid."""
    if has_fused:
        raise CheckpointError(
            "the FP8 checkpoint stores its experts as fused 3D tensors, whose block scales taer does not "
            "read; shard a checkpoint with per-expert tensors"
        )
    if keeps_blocks and intermediate_size % block:
        raise CheckpointError(
            f"the FP8 checkpoint's expert intermediate size {intermediate_size} is not a multiple "
            f"of its {block}-row scale blocks, so gate and up cannot be stacked with their block scales; "
            "shard with --expert-dtype bfloat16 (or int8/float8) to dequantize the experts"
        )


def read_tensor(files: CheckpointFiles, name: str, source: Scheme) -> torch.Tensor:
    """A checkpoint tensor; an FP8 checkpoint's quantized weight (one with a ``_scale_inv``) dequantized."""
    scale = checkpoint_scale_name(name)
    if not source.is_quantized or scale not in files.routing:
        return files.get(name)
    return source.dequantize(_fp8_weight(files, name), files.get(scale), DEQUANTIZED_DTYPE)


def read_blocks(files: CheckpointFiles, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 weight, float32 block scale) of checkpoint weights stacked by rows (gate then up): their
    block grids stack too, as ``check_fp8_experts`` made sure the rows end on a block boundary."""
    weights = [_fp8_weight(files, name) for name in names]
    scales = [files.get(checkpoint_scale_name(name)).to(torch.float32) for name in names]
    return torch.cat(weights).contiguous(), torch.cat(scales).contiguous()  # [R, C], [R/128, C/128]


def _fp8_weight(files: CheckpointFiles, name: str) -> torch.Tensor:
    weight = files.get(name)
    if weight.dtype != torch.float8_e4m3fn:
        raise CheckpointError(
            f"{name} is {DTYPE_NAMES.get(weight.dtype, weight.dtype)} in an FP8 e4m3 checkpoint; "
            "the checkpoint is inconsistent with its quantization_config"
        )
    return weight


def drop_quantization_config(config_path: Path) -> None:
    """The store's dense weights are dequantized and its experts' scheme is in the manifest: its
    config.json describes the plain model its runtime builds."""
    data = json.loads(config_path.read_text())
    data.pop("quantization_config", None)
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
