"""`taer bench NAME`: the benchmarks. Each prints a table and writes JSON (and plots where useful)."""

from __future__ import annotations

import argparse
import importlib

# name -> (module, one-line help); modules expose add_arguments(parser) and main(args).
BENCHMARKS = {
    "store": ("benchmarks.store", "expert load throughput, pattern switches, memory vs transformers"),
    "fidelity": ("benchmarks.fidelity", "pruned vs full accuracy per task and scorer on the demo model"),
    "retrieval": (
        "benchmarks.retrieval",
        "task retrieval accuracy and latency, retrieved vs oracle patterns",
    ),
    "serving": ("benchmarks.serving", "policies at equal expert memory, and taer serve vs a peer server"),
    "cluster": ("benchmarks.cluster", "mixed traffic: fifo vs switch-aware scheduling (and replicas)"),
    "fuzz": ("benchmarks.fuzz", "schema-driven fuzzing of a real taer serve: no 5xx, OpenAI-shaped 4xx"),
    "soak": ("benchmarks.soak", "32 clients, 2,000 requests: same answers as alone, none lost, flat memory"),
    "discover": ("benchmarks.discover", "tasks discovered in the demo's unlabelled prompts vs the true ones"),
    "api": ("benchmarks.api_features", "structured outputs' cost per token, and n samples vs n requests"),
    "fallback": ("benchmarks.fallback", "what each --fallback costs: accuracy and expert bytes loaded"),
    "all": ("benchmarks.report", "every benchmark in one run, with a report.md"),
}


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="run a benchmark")
    benches = parser.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    for name, (module_name, help_text) in BENCHMARKS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name == module_name:
                continue
            raise
        sub = benches.add_parser(name, help=help_text)
        module.add_arguments(sub)
        sub.set_defaults(func=module.main)


def run(args: argparse.Namespace) -> int:  # pragma: no cover - each benchmark sets its own func
    raise SystemExit("choose a benchmark")
