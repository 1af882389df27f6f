"""`taer calibrate STORE_DIR TASKS.yaml --out PATTERNS_DIR`: task patterns (TCESS) and the index;
with ``--refine DIR``, the patterns in PATTERNS_DIR updated from what `taer serve --record DIR` saw."""

from __future__ import annotations

import argparse
from pathlib import Path

from expert_store.errors import TaerError
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
    refine = parser.add_argument_group("refining patterns from served requests")
    refine.add_argument(
        "--refine",
        type=Path,
        default=None,
        metavar="DIR",
        help="instead of calibrating, move the TCESS of each pattern in --out toward the routing of the "
        "requests it served since it was made, as `taer serve --record DIR` recorded them (requests "
        "served in exact mode); --out is replaced atomically, its index kept, and a running server "
        "picks it up on SIGHUP or POST /v1/taer/reload",
    )
    refine.add_argument(
        "--refine-weight",
        type=float,
        default=0.5,
        metavar="W",
        help="the recorded requests' share in a refined pattern: its TCESS (and top-k frequency) becomes "
        "(1 - W) x the current table + W x the recorded requests' own; 0 keeps the patterns, 1 takes "
        "the recorded routing alone (default 0.5)",
    )
    refine.add_argument(
        "--refine-min-requests",
        type=int,
        default=8,
        metavar="N",
        help="a pattern with fewer recorded requests is left as it is (default 8)",
    )
    refine.add_argument(
        "--refine-pruned",
        action="store_true",
        help="also use requests served in pruned mode (past the first MoE layer their routing is biased "
        "toward the pattern that served them)",
    )
    refine.add_argument(
        "--propose-tasks",
        type=Path,
        default=None,
        metavar="OUT.yaml",
        help="with --refine: cluster the recorded texts of the requests that fell back to the general "
        "pattern (serve with --record-text) as `taer discover` does, and write the dense groups as a "
        "tasks file to calibrate as new tasks",
    )
    refine.add_argument(
        "--propose-min-size",
        type=int,
        default=32,
        help="with --propose-tasks: the fewest fallback requests a proposed task holds (default 32)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.refine is not None:
        return run_refine(args)
    if args.propose_tasks is not None:
        raise TaerError("--propose-tasks goes with --refine DIR")
    from retrieval.calibrate import CalibrationOptions, calibrate

    options = dataclass_from_args(CalibrationOptions, args)
    patterns = calibrate(args.store_dir, args.tasks_file, args.out, options)
    print(f"{args.out}: patterns for {', '.join(patterns.tasks)} (+ general)")
    if not args.no_index:
        from retrieval.build import build_index_for_tasks

        built = build_index_for_tasks(args.tasks_file, args.out, encoder_path=args.encoder)
        print(f"{built.directory}: retrieval index")
    return 0


def run_refine(args: argparse.Namespace) -> int:
    from retrieval.discover import DiscoveryOptions
    from retrieval.refine import RefineOptions, propose_tasks, refine_patterns

    options = RefineOptions(args.refine_weight, args.refine_min_requests, args.refine_pruned)
    result = refine_patterns(args.out, args.refine, args.store_dir, options, tasks_file=args.tasks_file)
    print(_refine_table(result))
    if result.refined:
        print(
            f"{args.out}: refined {', '.join(result.refined)} (weight {options.weight:g}); SIGHUP a server to use them"
        )
    else:
        print(f"{args.out}: unchanged, no pattern has {options.min_requests} usable recorded requests")
    if args.propose_tasks is not None:
        found = propose_tasks(
            result.fallback_texts,
            args.propose_tasks,
            DiscoveryOptions(min_size=args.propose_min_size),
            encoder_path=args.encoder,
        )
        if found is None:
            print(f"no new task among {len(result.fallback_texts)} recorded fallback texts")
        else:
            names = ", ".join(f"{t.name} ({t.cluster.size})" for t in found.tasks)
            print(
                f"{args.propose_tasks}: proposed task(s) {names}, from {len(result.fallback_texts)} fallback texts"
            )
    return 0


def _refine_table(result) -> str:
    """What was read and, per pattern, its recorded requests and how far its TCESS moved."""
    scan = result.scan
    lines = [
        f"{scan.num_records} records in {len(scan.files)} file(s); {scan.num_skipped} unreadable lines skipped",
        *(f"  not used: {count} {reason}" for reason, count in sorted(result.unused.items())),
        "",
        "| pattern | requests | tokens | refined | TCESS moved |",
        "|---|---:|---:|---|---:|",
    ]
    for name in result.patterns.patterns:
        recorded = result.routing.get(name)
        requests, tokens = (recorded.num_requests, recorded.num_tokens) if recorded else (0, 0)
        refined = name in result.refined
        moved = f"{100 * result.moved(name):.1f}%" if refined else "-"
        lines.append(f"| {name} | {requests} | {tokens} | {'yes' if refined else 'no'} | {moved} |")
    return "\n".join(lines)
