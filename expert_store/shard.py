"""`taer shard`: a Hugging Face checkpoint directory becomes a store, streamed tensor by tensor.

Peak memory is one MoE layer's experts (or one dense shard, ``dense_shard_bytes``), never the
whole checkpoint. Everything is written to a temporary sibling directory that is renamed into place
only once complete, so an interrupted run never leaves a store that looks valid.

An FP8 checkpoint with 128x128 block scales keeps its routed experts as they are, block scales and
all, and has its dense weights dequantized to bfloat16 (expert_store/fp8_checkpoint.py).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoConfig

from expert_store.atomic import atomic_directory
from expert_store.checkpoint import INDEX_FILE, CheckpointFiles, check_checkpoint_dir
from expert_store.errors import CheckpointError, StoreExistsError
from expert_store.families import Family, get_family
from expert_store.fp8_checkpoint import (
    DEQUANTIZED_DTYPE,
    check_fp8_experts,
    drop_quantization_config,
    read_blocks,
    read_tensor,
)
from expert_store.hashing import sha256_file, xxh3_of
from expert_store.keys import ExpertKey
from expert_store.manifest import ExpertEntry, FileEntry, Manifest
from expert_store.quant import NONE, Scheme, checkpoint_scheme, scale_name, scheme_for_expert_dtype
from expert_store.safetensors_file import DTYPE_NAMES, read_header
from expert_store.skeleton import MoELayout, dense_keys, empty_model, moe_layout

logger = logging.getLogger(__name__)

_FUSED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")


@dataclass
class _Plan:
    """Where each tensor of the checkpoint goes."""

    dense: dict[str, str]  # store name -> checkpoint name
    per_expert: dict[ExpertKey, dict[str, str]]  # key -> {"gate"|"up"|"down": checkpoint name}
    fused: dict[int, dict[str, str]]  # layer -> {"gate_up_proj"|"down_proj": checkpoint name}
    skipped: list[str]


def shard_checkpoint(
    model_dir: Path,
    store_dir: Path,
    *,
    force: bool = False,
    dense_shard_bytes: int = 2 << 30,
    expert_dtype: str = "source",
) -> Manifest:
    """Shard ``model_dir`` into ``store_dir`` and return the manifest written.

    ``expert_dtype`` says how the routed experts are stored: ``source`` as the checkpoint holds them,
    ``bfloat16`` cast, ``int8`` or ``float8`` quantized with a scale per output channel
    (expert_store/quant.py). Dense weights are kept as they are, except an FP8 checkpoint's, which
    are dequantized to bfloat16; its experts stay FP8 with their block scales under ``source`` and
    are dequantized to bfloat16 first under any other choice."""
    model_dir, store_dir = Path(model_dir), Path(store_dir)
    scheme = scheme_for_expert_dtype(expert_dtype)
    check_checkpoint_dir(model_dir)
    _check_output(store_dir, force)
    config = AutoConfig.from_pretrained(model_dir)
    family = get_family(config.model_type)
    source = checkpoint_scheme(getattr(config, "quantization_config", None), model_dir)
    if expert_dtype == "source":
        scheme = source
    cast = torch.bfloat16 if expert_dtype == "bfloat16" else None
    skeleton = empty_model(config)
    layout = moe_layout(skeleton)
    files = CheckpointFiles(model_dir)
    plan = _plan(files, family, layout, dense_keys(skeleton), config)
    if source.is_quantized:
        check_fp8_experts(bool(plan.fused), layout.intermediate_size, source.block, scheme is source)
    if plan.skipped:
        logger.warning(
            "ignoring %d tensors the model does not use, e.g. %s", len(plan.skipped), plan.skipped[0]
        )

    try:
        with atomic_directory(store_dir) as tmp:
            manifest = _write_store(
                tmp, files, plan, _Storage(layout, family, scheme, cast, source), model_dir, dense_shard_bytes
            )
    finally:
        files.close()
    return manifest


def _check_output(store_dir: Path, force: bool) -> None:
    if store_dir.exists() and not store_dir.is_dir():
        raise StoreExistsError(f"{store_dir} exists and is not a directory")
    if store_dir.is_dir() and any(store_dir.iterdir()) and not force:
        raise StoreExistsError(f"{store_dir} is not empty; pass --force to replace it")


def _plan(files: CheckpointFiles, family: Family, layout: MoELayout, expected: set[str], config) -> _Plan:
    plan = _Plan(dense={}, per_expert=defaultdict(dict), fused=defaultdict(dict), skipped=[])
    moe_layers = set(layout.moe_layers)
    for name in files.names:
        canonical = family.canonical_name(name)
        expert = family.match_expert(name)
        fused = _FUSED.fullmatch(canonical)
        if expert is not None and expert[0] in moe_layers:
            layer, index, proj = expert
            plan.per_expert[ExpertKey(layer, index)][proj] = name
        elif fused is not None and int(fused.group(1)) in moe_layers:
            plan.fused[int(fused.group(1))][fused.group(2)] = name
        elif canonical in expected:
            plan.dense[canonical] = name
        elif not name.endswith("_scale_inv") or name.removesuffix("_scale_inv") not in files.routing:
            plan.skipped.append(name)  # (an FP8 weight's scale is read with its weight)
    _check_complete(plan, layout, expected, config)
    return plan


def _check_complete(plan: _Plan, layout: MoELayout, expected: set[str], config) -> None:
    missing = sorted(expected - set(plan.dense))
    if getattr(config, "tie_word_embeddings", False):
        missing = [name for name in missing if name != "lm_head.weight"]
    if missing:
        raise CheckpointError(
            f"the checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[0]}"
        )
    for layer in layout.moe_layers:
        if layer in plan.fused:
            if set(plan.fused[layer]) != {"gate_up_proj", "down_proj"}:
                raise CheckpointError(f"layer {layer} has an incomplete fused expert tensor pair")
            continue
        for expert in range(layout.num_experts):
            parts = plan.per_expert.get(ExpertKey(layer, expert), {})
            if set(parts) != {"gate", "up", "down"}:
                raise CheckpointError(
                    f"expert ({ExpertKey(layer, expert)}) is incomplete in the checkpoint "
                    f"(found {sorted(parts) or 'nothing'})"
                )


@dataclass(frozen=True, slots=True)
class _Storage:
    """What the store is of and how its experts are written."""

    layout: MoELayout
    family: Family
    scheme: Scheme  # 8-bit schemes quantize each expert's weights
    cast: torch.dtype | None  # full-precision experts cast to this dtype (None: as the source)
    source: Scheme = NONE  # how the checkpoint holds its weights (an FP8 checkpoint: float8-block128)

    @property
    def keeps_source(self) -> bool:
        """Experts are written as the quantized checkpoint holds them, scales and all."""
        return self.source.is_quantized and self.scheme is self.source


def _write_store(
    out: Path,
    files: CheckpointFiles,
    plan: _Plan,
    storage: _Storage,
    model_dir: Path,
    dense_shard_bytes: int,
) -> Manifest:
    layout = storage.layout
    total = len(plan.dense) + len(layout.moe_layers)
    with tqdm(total=total, desc="sharding", unit="tensor") as progress:
        dense_files = _write_dense(out, files, plan, storage.source, dense_shard_bytes, progress)
        (out / "experts").mkdir()
        experts: dict[ExpertKey, ExpertEntry] = {}
        expert_files = []
        dtype = "unknown"
        for layer in layout.moe_layers:
            tensors = _layer_experts(files, plan, layer, layout.num_experts, storage)
            if storage.cast is not None:
                tensors = {name: tensor.to(storage.cast) for name, tensor in tensors.items()}
            # what 8-bit experts dequantize to
            dtype = DTYPE_NAMES[
                DEQUANTIZED_DTYPE if storage.source.is_quantized else next(iter(tensors.values())).dtype
            ]
            if storage.scheme.is_quantized and not storage.keeps_source:
                tensors = _quantize(tensors, storage.scheme)
            entry, layer_experts = _write_layer(out, layer, tensors, layout.num_experts, storage.scheme)
            expert_files.append(entry)
            experts.update(layer_experts)
            progress.update(1)
    extra = _copy_side_files(model_dir, out)
    if storage.source.is_quantized:
        drop_quantization_config(out / "config.json")
    manifest = Manifest(
        family=storage.family.model_type,
        dtype=dtype,
        layout=layout,
        dense_files=dense_files,
        expert_files=expert_files,
        experts=experts,
        fingerprint=_fingerprint(out / "config.json", experts, dense_files),
        source=str(model_dir.resolve()),
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        extra_files=extra,
        expert_scheme=storage.scheme.name,
    )
    manifest.save(out)  # written last: a store without a manifest is never taken for complete
    return manifest


def _write_dense(
    out: Path, files: CheckpointFiles, plan: _Plan, source: Scheme, limit: int, progress: tqdm
) -> list[FileEntry]:
    entries, pending, pending_bytes = [], {}, 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        path = out / f"dense-{len(entries) + 1:05d}.safetensors"
        save_file(pending, str(path))
        entries.append(FileEntry(path.name, path.stat().st_size, sha256_file(path)))
        pending, pending_bytes = {}, 0

    for store_name, checkpoint_name in sorted(plan.dense.items()):
        tensor = read_tensor(files, checkpoint_name, source).contiguous()
        pending[store_name] = tensor
        pending_bytes += tensor.numel() * tensor.element_size()
        progress.update(1)
        if pending_bytes >= limit:
            flush()
    if pending or not entries:
        flush()
    return entries


def _layer_experts(
    files: CheckpointFiles, plan: _Plan, layer: int, num_experts: int, storage: _Storage
) -> dict[str, torch.Tensor]:
    """One layer's experts as ``{e}.gate_up_proj`` [2I, D] and ``{e}.down_proj`` [D, I]; an FP8
    checkpoint's either with their block scales (``{name}_scale``, [2I/128, D/128] and [D/128, I/128],
    ragged last blocks rounded up) or dequantized."""
    tensors = {}
    fused = plan.fused.get(layer)
    for expert in range(num_experts):
        if fused:
            tensors[f"{expert}.gate_up_proj"] = files.get_rows(fused["gate_up_proj"], expert).contiguous()
            tensors[f"{expert}.down_proj"] = files.get_rows(fused["down_proj"], expert).contiguous()
            continue
        parts = plan.per_expert[ExpertKey(layer, expert)]
        for name, projections in (
            (f"{expert}.gate_up_proj", ("gate", "up")),
            (f"{expert}.down_proj", ("down",)),
        ):
            names = [parts[projection] for projection in projections]
            if storage.keeps_source:
                tensors[name], tensors[scale_name(name)] = read_blocks(files, names)
            else:
                tensors[name] = torch.cat(
                    [read_tensor(files, n, storage.source) for n in names], dim=0
                ).contiguous()
    return tensors


def _quantize(tensors: dict[str, torch.Tensor], scheme: Scheme) -> dict[str, torch.Tensor]:
    """Each weight as 8 bits plus its float32 scale per output channel (``{name}_scale``)."""
    quantized = {}
    for name, weight in tensors.items():
        quantized[name], quantized[scale_name(name)] = scheme.quantize(weight)
    return quantized


def _write_layer(
    out: Path, layer: int, tensors: dict[str, torch.Tensor], num_experts: int, scheme: Scheme
) -> tuple[FileEntry, dict[ExpertKey, ExpertEntry]]:
    relative = f"experts/layer-{layer:03d}.safetensors"
    path = out / relative
    save_file(tensors, str(path), metadata={"layer": str(layer), "expert_scheme": scheme.name})
    infos = read_header(path)
    experts = {}
    for expert in range(num_experts):
        names = [f"{expert}.gate_up_proj", f"{expert}.down_proj"]
        if scheme.is_quantized:
            names += [scale_name(name) for name in names]
        ranges = [(infos[name].start, infos[name].end) for name in names]
        checksum = xxh3_of(*(_bytes_of(tensors[name]) for name in names))  # weights, then scales
        scales = ranges[2:] if scheme.is_quantized else [None, None]
        experts[ExpertKey(layer, expert)] = ExpertEntry(
            relative, ranges[0], ranges[1], checksum, scheme.name, *scales
        )
    return FileEntry(relative, path.stat().st_size, sha256_file(path)), experts


def _copy_side_files(model_dir: Path, out: Path) -> list[str]:
    """config.json, generation config, tokenizer files and the like: every small non-weight file."""
    copied = []
    for path in sorted(model_dir.iterdir()):
        if not path.is_file() or path.name.endswith(_WEIGHT_SUFFIXES) or path.name == INDEX_FILE:
            continue
        if path.stat().st_size > 64 << 20:
            logger.warning(
                "not copying %s (%d MB): too large for a side file", path.name, path.stat().st_size >> 20
            )
            continue
        shutil.copy2(path, out / path.name)
        copied.append(path.name)
    return copied


def _bytes_of(tensor: torch.Tensor):
    """The tensor's raw bytes as safetensors writes them (a view, no copy)."""
    return tensor.contiguous().view(-1).view(torch.uint8).numpy()


def _fingerprint(config_path: Path, experts: dict[ExpertKey, ExpertEntry], dense: list[FileEntry]) -> str:
    """Identifies the model's weights: config, every expert's checksum, every dense file's."""
    digest = xxhash.xxh3_128()
    digest.update(json.dumps(json.loads(config_path.read_text()), sort_keys=True).encode())
    for key in sorted(experts):
        digest.update(experts[key].xxh3.encode())
    for entry in dense:
        digest.update(entry.sha256.encode())
    return digest.hexdigest()
