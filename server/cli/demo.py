"""`taer demo build`: train the embedded default MoE and write its task suite (cached).
`taer demo prepare`: build, shard, calibrate and index it (what the container runs without a model).
Both take ``--family deepseek_v3`` for the DeepSeek-V3-family demo on the extended task suite."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from demo.build import DEFAULT_OUT, Buildable, BuildSpec, build_demo
from demo.train import DEFAULT_STEPS, TrainConfig

FAMILIES = ("qwen3_moe", "deepseek_v3")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="the embedded demo MoE and its task suite")
    actions = parser.add_subparsers(dest="demo_command", metavar="ACTION", required=True)
    build = actions.add_parser(
        "build",
        help="train the demo model and write its task suite (returns at once when already built)",
        description="Writes OUT/model (a Hugging Face checkpoint), OUT/tasks/tasks.yaml and OUT/build.json.",
    )
    build.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output directory (default {DEFAULT_OUT}, or {DEFAULT_OUT}-deepseek_v3 for that family)",
    )
    build.add_argument("--force", action="store_true", help="rebuild even if a complete build is there")
    build.add_argument("--seed", type=int, default=0, help="seed of the data and the weights (default 0)")
    build.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"training steps (default {DEFAULT_STEPS}; the deepseek_v3 demo's own default otherwise)",
    )
    _add_family(build)
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
    _add_family(prepare)
    prepare.set_defaults(func=run_prepare)


def _add_family(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--family",
        choices=FAMILIES,
        default="qwen3_moe",
        help="qwen3_moe: the default demo (six tasks); deepseek_v3: 64 routed experts, top-6, a shared "
        "expert, group-limited sigmoid routing, ten tasks",
    )


def family_spec(family: str, seed: int = 0, steps: int | None = None) -> Buildable:
    """The build spec of the demo ``family`` with ``seed`` and ``steps`` (None: the family's default)."""
    if family == "deepseek_v3":
        from demo.deepseek_build import DeepseekBuildSpec
        from demo.deepseek_train import DeepseekTrainConfig

        train = DeepseekTrainConfig()
        if steps is not None:
            train = dataclasses.replace(train, base=dataclasses.replace(train.base, steps=steps))
        return DeepseekBuildSpec(seed=seed, train=train)
    return BuildSpec(seed=seed, train=dataclasses.replace(TrainConfig(), steps=steps or DEFAULT_STEPS))


def run(args: argparse.Namespace) -> int:
    from demo.deepseek_build import DEEPSEEK_DEFAULT_OUT

    out = args.out or (DEEPSEEK_DEFAULT_OUT if args.family == "deepseek_v3" else DEFAULT_OUT)
    result = build_demo(out, spec=family_spec(args.family, args.seed, args.steps), force=args.force)
    print(result.path)
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    from demo.prepare import DemoPaths, prepare_demo

    default = DemoPaths.under(args.data)
    paths = DemoPaths(
        args.demo or default.demo, args.store or default.store, args.patterns or default.patterns
    )
    # The default family's call is unchanged: prepare_demo builds the default spec itself.
    family = {} if args.family == "qwen3_moe" else {"spec": family_spec(args.family)}
    prepared = prepare_demo(paths, encoder_path=args.encoder, **family)
    print(f"store: {prepared.store}\npatterns: {prepared.patterns}")
    return 0
