"""8-bit experts: how a store's expert weights are quantized at shard time and dequantized in the
expert forward.

A store keeps all its routed experts in one *scheme*:

- ``none``: the weights in the store's dtype, used as they are;
- ``int8-channel``: int8, symmetric, one float32 scale per output channel (row): w = q * s[row];
- ``float8-channel``: float8 e4m3fn, one float32 scale per output channel, s = max|row| / 448;
- ``float8-block128``: float8 e4m3fn with one float32 scale per 128x128 block, ``s`` [ceil(R/128),
  ceil(C/128)], w = q * s[row // 128, col // 128]: the layout of FP8 checkpoints (DeepSeek-V3's
  ``weight_scale_inv``), kept as the checkpoint has it; taer never writes it from full precision.

Per output channel rather than 128x128 blocks when taer quantizes itself: the dequantization is one
broadcast multiply (a block grid must first be expanded to the weight's shape, the dearer step on a
CPU), it works for any shape (an expert 192 wide has no whole 128-column blocks), it is the layout
of row-wise scaled matmuls (``torch._scaled_mm`` with per-row scales on Hopper), and its scales cost
4 bytes per row: 1.9% of the demo model's int8 expert bytes.

Legend: R = output channels (rows), C = input channels (columns).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from expert_store.errors import CheckpointError, StoreError

_FLOAT8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
_INT8_MAX = 127
# Every e4m3 byte's value: on a CPU, looking 8-bit weights up here (index_select with int32 indexes)
# is several times faster than converting them (5x at 1536 x 2048 on this project's machine).
_FLOAT8_VALUES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()


def _values(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The 8-bit weight's values in ``dtype`` (exact: e4m3 and int8 values fit bfloat16, float16 and
    float32)."""
    if weight.dtype == torch.float8_e4m3fn and weight.device.type == "cpu":
        codes = weight.view(torch.uint8).reshape(-1).to(torch.int32)
        return _FLOAT8_VALUES.to(dtype).index_select(0, codes).view(weight.shape)
    return weight.to(dtype)


def _to_float32(weight: torch.Tensor) -> torch.Tensor:
    return _values(weight, torch.float32)


@dataclass(frozen=True, slots=True)
class Scheme:
    """How one store holds its expert weights. ``weight_dtype`` None: the store's dtype, no scales;
    ``block`` None: a scale per output channel, else one per ``block`` x ``block`` square."""

    name: str
    weight_dtype: torch.dtype | None
    block: int | None = None

    @property
    def is_quantized(self) -> bool:
        return self.weight_dtype is not None

    def scale_shape(self, rows: int, cols: int) -> tuple[int, ...]:
        """The shape of the float32 scale of a weight [R, C]: [R], or [ceil(R/B), ceil(C/B)]."""
        if self.block is None:
            return (rows,)
        return (math.ceil(rows / self.block), math.ceil(cols / self.block))

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(8-bit weight [R, C], float32 scale [R]) of a weight [R, C]."""
        assert self.is_quantized and self.block is None, "only per-channel 8-bit schemes quantize"
        weight = weight.to(torch.float32)
        top = _INT8_MAX if self.weight_dtype == torch.int8 else _FLOAT8_MAX
        scale = weight.abs().amax(dim=1) / top  # [R]
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
        scaled = (weight / scale[:, None]).clamp(-top, top)  # [R, C]
        if self.weight_dtype == torch.int8:
            scaled = scaled.round()
        return scaled.to(self.weight_dtype).contiguous(), scale.contiguous()

    def dequantize(
        self, weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        """The weight [R, C] in ``dtype``: ``(q * s[row])``, or ``q * s[row // B, col // B]`` for
        block scales, computed in float32, then cast (the one definition the runtime, the shard's
        dequantization of FP8 checkpoints and the tests' reference all use)."""
        if not self.is_quantized:
            return weight if weight.dtype == dtype else weight.to(dtype)
        values = _to_float32(weight)
        if self.block is not None:
            rows, cols = weight.shape
            scale = scale.repeat_interleave(self.block, 0)[:rows]  # [R, ceil(C/B)]
            return (values * scale.repeat_interleave(self.block, 1)[:, :cols]).to(dtype)
        return (values * scale[:, None]).to(dtype)  # [R, C]

    def linear(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """``x`` [T, C] times the weight [R, C] transposed, in ``x``'s dtype: [T, R].

        int8 weights with bfloat16 activations on a CPU use torch's weight-only int8 kernel
        (``_weight_int8pack_mm``, no dequantized copy). Other per-channel schemes multiply by the 8-bit
        values converted exactly to ``x``'s dtype (float8 looked up by its bytes on a CPU) and apply
        each output channel's scale to the product, not to the weight: the same result up to
        rounding, with one multiply per output instead of one per weight. Block scales dequantize.
        """
        if not self.is_quantized:
            return F.linear(x, weight)
        if self.block is not None:
            return F.linear(x, self.dequantize(weight, scale, x.dtype))
        if self.weight_dtype == torch.int8 and x.dtype == torch.bfloat16 and x.device.type == "cpu":
            return torch._weight_int8pack_mm(x.contiguous(), weight, scale.to(torch.bfloat16))
        return F.linear(x, _values(weight, x.dtype)) * scale.to(x.dtype)


NONE = Scheme("none", None)
FLOAT8_BLOCK128 = Scheme("float8-block128", torch.float8_e4m3fn, block=128)
SCHEMES: dict[str, Scheme] = {
    scheme.name: scheme
    for scheme in (
        NONE,
        Scheme("int8-channel", torch.int8),
        Scheme("float8-channel", torch.float8_e4m3fn),
        FLOAT8_BLOCK128,
    )
}
# `taer shard --expert-dtype`: what each choice stores ("source" and "bfloat16" keep full precision).
EXPERT_DTYPES = ("source", "bfloat16", "float8", "int8")
_SCHEME_OF_DTYPE = {"source": "none", "bfloat16": "none", "float8": "float8-channel", "int8": "int8-channel"}


def scheme_for_expert_dtype(expert_dtype: str) -> Scheme:
    """The scheme ``taer shard --expert-dtype`` writes."""
    try:
        return SCHEMES[_SCHEME_OF_DTYPE[expert_dtype]]
    except KeyError:
        raise CheckpointError(
            f"unknown expert dtype {expert_dtype!r}; use one of {', '.join(EXPERT_DTYPES)}"
        ) from None


def get_scheme(name: str) -> Scheme:
    """The scheme a manifest names; an unknown one (a newer taer's store) is refused."""
    try:
        return SCHEMES[name]
    except KeyError:
        raise StoreError(
            f"the store's experts use scheme {name!r}, which this taer does not read "
            f"(it reads {', '.join(SCHEMES)}); upgrade taer or re-run `taer shard`"
        ) from None


def checkpoint_scale_name(tensor_name: str) -> str:
    """The name of an FP8 checkpoint's scale for a weight (``...down_proj.weight_scale_inv``): despite
    the name, the weight is ``q * scale_inv``."""
    return f"{tensor_name}_scale_inv"


def scale_name(tensor_name: str) -> str:
    """The store's name for a weight's scale tensor (``3.down_proj`` -> ``3.down_proj_scale``)."""
    return f"{tensor_name}_scale"


_CHECKPOINT_SCHEMES = {
    "gptq": "GPTQ",
    "awq": "AWQ",
    "bitsandbytes": "bitsandbytes",
    "mxfp4": "MXFP4",
    "fp8": "FP8",
    "compressed-tensors": "compressed-tensors",
    "hqq": "HQQ",
    "eetq": "EETQ",
    "aqlm": "AQLM",
    "quanto": "quanto",
    "torchao": "torchao",
}


def checkpoint_scheme(quantization_config, model_dir) -> Scheme:
    """How a checkpoint's weights are stored, from its ``config.json``'s ``quantization_config``
    (None: full precision). FP8 e4m3 with 128x128 block scales and dynamic activation scales
    (DeepSeek-V3's layout) is read; any other scheme is refused in one line naming it."""
    if not quantization_config:
        return NONE
    data = quantization_config if isinstance(quantization_config, dict) else quantization_config.to_dict()
    is_fp8 = str(data.get("quant_method", "")).lower() == "fp8"
    if (
        is_fp8
        and data.get("fmt", "e4m3") == "e4m3"
        and data.get("activation_scheme", "dynamic") == "dynamic"
        and list(data.get("weight_block_size") or []) == [128, 128]
    ):
        return FLOAT8_BLOCK128
    raise _refusal(data, model_dir)


def _refusal(data: dict, model_dir) -> CheckpointError:
    """The one-line refusal of a quantized checkpoint taer does not read."""
    method = str(data.get("quant_method", "unknown"))
    label = _CHECKPOINT_SCHEMES.get(method.lower(), method)
    if method.lower() == "bitsandbytes":
        label += " 4-bit" if data.get("load_in_4bit") else " 8-bit" if data.get("load_in_8bit") else ""
    if method.lower() == "fp8":
        block = data.get("weight_block_size")
        label += f" with {'x'.join(map(str, block))} block scales" if block else " without weight_block_size"
        if data.get("fmt", "e4m3") != "e4m3" or data.get("activation_scheme", "dynamic") != "dynamic":
            label += f" ({data.get('fmt', 'e4m3')}, {data.get('activation_scheme', 'dynamic')} activations)"
    return CheckpointError(
        f"{model_dir} is quantized with {label} (quantization_config.quant_method = {method!r}), which "
        "taer does not read (of quantized checkpoints it reads FP8 e4m3 with 128x128 block scales); "
        "shard the unquantized (bfloat16) checkpoint instead, with "
        "`--expert-dtype int8` or `--expert-dtype float8` for 8-bit experts"
    )
