"""`taer demo build`: train the embedded default MoE and write its task suite (cached).
`taer demo prepare`: build, shard, calibrate and index it (what the container runs without a model)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from demo.build import DEFAULT_OUT, BuildSpec, build_demo
from demo.train import DEFAULT_STEPS, TrainConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="the embedded demo MoE and its task suite")
    actions = parser.add_subparsers(dest="demo_command", metavar="ACTION", required=True)
    build = actions.add_parser(
        "build",
        help="train the demo model and write its task suite (returns at once when already built)",
        description="Writes OUT/model (a Hugging Face checkpoint), OUT/tasks/tasks.yaml and OUT/build.json.",
    )
    build.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})"
    )
    build.add_argument("--force", action="store_true", help="rebuild even if a complete build is there")
    build.add_argument("--seed", type=int, default=0, help="seed of the data and the weights (default 0)")
    build.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help=f"training steps (default {DEFAULT_STEPS})"
    )
    build.set_defaults(func=run)
    prepare = actions.add_parser(
        "prepare",
        help="build, shard, calibrate and index the demo (each step skipped when up to date)",
        description="Writes DATA/demo, DATA/store and DATA/patterns (each movable with its own flag).",
    )
    prepare.add_argument("--data", type=Path, default=Path(".taer"), help="parent of the three outputs")
    prepare.add_argument("--demo", type=Path, default=None, help="the demo build (default DATA/demo)")
    prepare.add_argument("--store", type=Path, default=None, help="the store (default DATA/store)")
    prepare.add_argument("--patterns", type=Path, default=None, help="patterns (default DATA/patterns)")
    prepare.add_argument(
        "--encoder",
        type=Path,
        default=None,
        metavar="NAME_OR_DIR",
        help="the index's encoder: minilm (default), mpnet, or a sentence-transformers model directory",
    )
    prepare.set_defaults(func=run_prepare)


def run(args: argparse.Namespace) -> int:
    spec = BuildSpec(seed=args.seed, train=dataclasses.replace(TrainConfig(), steps=args.steps))
    result = build_demo(args.out, spec=spec, force=args.force)
    print(result.path)
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    from demo.prepare import DemoPaths, prepare_demo

    default = DemoPaths.under(args.data)
    paths = DemoPaths(
        args.demo or default.demo, args.store or default.store, args.patterns or default.patterns
    )
    prepared = prepare_demo(paths, encoder_path=args.encoder)
    print(f"store: {prepared.store}\npatterns: {prepared.patterns}")
    return 0
