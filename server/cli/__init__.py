"""The `taer` command: one entry point, one module per subcommand.

Each subcommand module in this package exposes ``register(subparsers)``, which adds its parser and
sets ``func`` to a function taking the parsed arguments. Entry points stay thin: they parse and call
library code. Every domain error ends the command with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from expert_store.errors import TaerError

# Imported lazily so `taer --help` does not pay for torch; a module not yet present is skipped.
SUBCOMMANDS = (
    "shard",
    "verify",
    "demo",
    "eval",
    "discover",
    "calibrate",
    "index",
    "serve",
    "quickstart",
    "bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taer", description="Task-adaptive expert retrieval for Mixture-of-Experts models."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"server.cli.{name}")
        except ModuleNotFoundError as error:
            if error.name == f"server.cli.{name}":
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except TaerError as error:  # e.g. a TAER_* variable that is not a number
        print(f"taer: error: {error}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        result = args.func(args)
    except TaerError as error:
        print(f"taer {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
