"""`taer calibrate STORE_DIR TASKS.yaml --out PATTERNS_DIR`: task patterns (TCESS) and the index."""

from __future__ import annotations

import argparse
from pathlib import Path

from server.cli.arguments import ENCODERS, add_encoder_argument, dataclass_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser("calibrate", help="measure which experts each task needs (TCESS patterns)")
    parser.add_argument("store_dir", type=Path)
    parser.add_argument("tasks_file", type=Path, help="TASKS.yaml: task name -> calibration prompts file")
    parser.add_argument("--out", type=Path, required=True, help="patterns directory to write")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512, help="tokens per calibration sequence")
    parser.add_argument(
        "--stream-layers",
        action="store_true",
        help="pass all calibration tokens through one layer at a time (models larger than the device)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--ka", type=int, default=None, help="experts per token that TCESS considers (default top-k)"
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="fixed confidence threshold (default: per layer, the mean of the top probability)",
    )
    parser.add_argument(
        "--keep-experts",
        type=Path,
        default=None,
        help='JSON {"LAYER": [EXPERT, ...]} of experts every pattern retains',
    )
    parser.add_argument(
        "--super-factor",
        type=float,
        default=10.0,
        help="an expert whose largest output exceeds this multiple of its layer's median is a super expert",
    )
    add_encoder_argument(parser, f"the index's encoder: {ENCODERS}")
    parser.add_argument("--no-index", action="store_true", help="write patterns only, no retrieval index")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from retrieval.calibrate import CalibrationOptions, calibrate

    options = dataclass_from_args(CalibrationOptions, args)
    patterns = calibrate(args.store_dir, args.tasks_file, args.out, options)
    print(f"{args.out}: patterns for {', '.join(patterns.tasks)} (+ general)")
    if not args.no_index:
        from retrieval.build import build_index_for_tasks

        built = build_index_for_tasks(args.tasks_file, args.out, encoder_path=args.encoder)
        print(f"{built.directory}: retrieval index")
    return 0
