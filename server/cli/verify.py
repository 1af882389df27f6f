"""`taer verify STORE_DIR`: check every checksum of a store."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("verify", help="check every file and expert checksum of a store")
    parser.add_argument("store_dir", type=Path)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from expert_store.store import verify_store

    report = verify_store(args.store_dir)
    for problem in report.problems:
        print(f"taer verify: {problem}", file=sys.stderr)
    status = "ok" if report.ok else f"{len(report.problems)} problem(s)"
    print(
        f"{args.store_dir}: {report.files_checked} files, {report.experts_checked} experts checked: {status}"
    )
    return 0 if report.ok else 1
