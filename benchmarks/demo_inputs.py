"""Inputs shared by the demo benchmarks (fidelity, retrieval): the demo model, or any store given."""

from __future__ import annotations

import argparse
from pathlib import Path

from expert_store.errors import StoreError


def resolve_inputs(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """(store, patterns, tasks file): the ones given, or the demo model's, built and cached under --data."""
    if args.store is not None:
        if args.patterns is None or args.tasks is None:
            raise StoreError("--store needs --patterns and --tasks as well")
        return args.store, args.patterns, args.tasks
    from demo.prepare import DemoPaths, prepare_demo

    prepared = prepare_demo(DemoPaths.under(args.data))
    return prepared.store, prepared.patterns, prepared.tasks_file


def add_common_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """Inputs and outputs shared by the demo benchmarks (fidelity, retrieval)."""
    parser.add_argument("--json", type=Path, help=f"write the JSON report here (default OUT/{name}.json)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="directory for the report")
    parser.add_argument("--data", type=Path, default=Path(".taer"), help="demo model, store and patterns")
    parser.add_argument(
        "--store", type=Path, help="another store instead of the demo (with --patterns, --tasks)"
    )
    parser.add_argument("--patterns", type=Path, help="patterns directory of --store")
    parser.add_argument("--tasks", type=Path, help="tasks.yaml with labelled eval/heldout prompts")
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per generate call")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a small shared CPU, more threads contend and run slower)",
    )


def set_threads(args: argparse.Namespace) -> None:
    """Apply ``--threads`` (process-wide)."""
    import torch

    torch.set_num_threads(max(1, args.threads))
