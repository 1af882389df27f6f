"""`taer index TASKS.yaml PATTERNS_DIR`: embed every task's prompts and build the retrieval index.

The index goes where `taer calibrate` puts it and `taer serve` looks for it: ``PATTERNS_DIR/index``.
Use it to rebuild the index alone (another encoder, other thresholds) without recalibrating.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "index", help="embed the tasks' calibration prompts and examples into a retrieval index"
    )
    parser.add_argument("tasks_file", type=Path, help="TASKS.yaml (as given to `taer calibrate`)")
    parser.add_argument(
        "patterns_dir", type=Path, help="the patterns directory; the index goes in its index/"
    )
    parser.add_argument(
        "--encoder",
        type=Path,
        default=None,
        metavar="NAME_OR_DIR",
        help="minilm (default), mpnet, or a sentence-transformers model directory; the index records it",
    )
    parser.add_argument("--kind", choices=["auto", "flat", "hnsw"], default="auto")
    parser.add_argument("--hnsw-threshold", type=int, default=None, help="auto: HNSW from this many texts")
    parser.add_argument(
        "--min-confidence", type=float, default=None, help="vote share below which `general` serves"
    )
    parser.add_argument(
        "--min-similarity", type=float, default=None, help="cosine below which `general` serves"
    )
    parser.add_argument(
        "--close-margin", type=float, default=None, help="confidence gap that is a close call"
    )
    space = parser.add_mutually_exclusive_group()
    space.add_argument(
        "--shrinkage",
        type=float,
        default=None,
        help="task space: how far the within-task scatter is shrunk toward the identity, in [0, 1] (0.5)",
    )
    space.add_argument(
        "--no-task-space", action="store_true", help="vote on the encoder's vectors, without the task space"
    )
    parser.add_argument(
        "--query", action="append", default=[], help="try a query on the new index (repeatable)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from retrieval.build import IndexOptions, build_index_for_tasks

    options = IndexOptions.with_overrides(
        args.kind,
        min_confidence=args.min_confidence,
        min_similarity=args.min_similarity,
        close_margin=args.close_margin,
        hnsw_threshold=args.hnsw_threshold,
        shrinkage=args.shrinkage,
        task_space=not args.no_task_space,
    )
    built = build_index_for_tasks(args.tasks_file, args.patterns_dir, args.encoder, options)
    index = built.index
    shrinkage = options.settings.projection_shrinkage
    space = "no task space" if index.task_space is None else f"task space (shrinkage {shrinkage})"
    print(
        f"{built.directory}: {index.kind} index, {index.size} texts, {len(index.tasks)} tasks, {space}, "
        f"encoder {index.fingerprint}"
    )
    for text, result in zip(args.query, index.query(args.query), strict=True):
        print(
            f"  {text!r} -> {result.task} (candidate {result.candidate}, confidence {result.confidence:.2f}, "
            f"similarity {result.similarity:.2f}, runner-up {result.runner_up})"
        )
    return 0
