"""`taer shard MODEL_DIR STORE_DIR`: a Hugging Face checkpoint directory becomes an expert store."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("shard", help="split a Hugging Face MoE checkpoint into an expert store")
    parser.add_argument("model_dir", type=Path, help="checkpoint directory (config.json + *.safetensors)")
    parser.add_argument("store_dir", type=Path, help="output store directory")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--dense-shard-gb", type=float, default=2.0, help="size of each dense weight file")
    parser.add_argument(
        "--expert-dtype",
        choices=("source", "bfloat16", "float8", "int8"),
        default="source",
        help="how routed experts are stored: as the checkpoint holds them (an FP8 checkpoint's with their "
        "128x128 block scales), cast to bfloat16, or 8-bit (int8 or float8 e4m3) with a float32 scale per "
        "output channel, dequantized in the expert forward",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from expert_store.shard import shard_checkpoint

    manifest = shard_checkpoint(
        args.model_dir,
        args.store_dir,
        force=args.force,
        dense_shard_bytes=int(args.dense_shard_gb * (1 << 30)),
        expert_dtype=args.expert_dtype,
    )
    layout = manifest.layout
    scheme = manifest.expert_scheme if manifest.expert_scheme != "none" else manifest.dtype
    print(
        f"{args.store_dir}: {manifest.family}, {len(layout.moe_layers)} MoE layers x {layout.num_experts} experts "
        f"(top-{layout.top_k}), experts {manifest.expert_bytes / 1e9:.3f} GB ({scheme}), dense {manifest.dense_bytes / 1e9:.3f} GB"
    )
    return 0
