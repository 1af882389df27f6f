"""`taer bench all --out DIR` (what `make bench` runs): every benchmark in one run, one report.

DIR gets ``report.md`` (machine, date, every target met or missed, then each section), a JSON file
per section and the PNG figures. Sections: expert-memory policies (part 1), taer serve vs a peer
server (2), mixed traffic on one replica and on two Ray Serve replicas (2b), memory at keep 100/50/25%
(3), fidelity and retrieval (4, their own benchmarks), the expert store (5), and what structured
outputs and ``n`` samples cost (6), and the tasks discovered in the demo's unlabelled prompts (7). A
section that fails, or whose benchmark is not installed, is reported as such and the others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import logging
import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.cluster import ClusterSettings
from benchmarks.common import machine_info, write_json
from benchmarks.serving import BenchInputs, ServingSettings
from expert_store.errors import TaerError

logger = logging.getLogger(__name__)

SECTIONS = ("policies", "server", "cluster", "memory", "fidelity", "retrieval", "store", "api", "discover")


@dataclass(frozen=True, slots=True)
class ReportSizes:
    """How big each benchmark runs; the defaults keep `make bench` under 20 minutes on 2 cores."""

    per_task: int = 8
    max_new_tokens: int = 16
    keeps: tuple[float, ...] = (0.5, 0.25)
    threads: int = 1
    serving: ServingSettings = field(default_factory=ServingSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    # with the expert dtype column (bfloat16, int8, float8 experts at keep 100/50/25%): 49 s for the
    # whole section on the demo here, sharding and calibrating the three stores included; 17 s without
    fidelity_args: tuple[str, ...] = (
        "--limit",
        "20",
        "--seeds",
        "0",
        "1",
        "--expert-dtypes",
        "bfloat16,int8,float8",
    )
    retrieval_args: tuple[str, ...] = (
        "--sizes",
        "1000",
        "10000",
        "--latency-queries",
        "100",
        "--latency-batch-sizes",
        "1",
        "8",
    )
    store_args: tuple[str, ...] = (
        "--experts",
        "32",
        "--hidden",
        "1024",
        "--intermediate",
        "512",
        "--layers",
        "4",
    )
    api_args: tuple[str, ...] = ()
    discover_args: tuple[str, ...] = ()


QUICK = ReportSizes(
    per_task=2,
    max_new_tokens=4,
    keeps=(0.5,),
    serving=ServingSettings(clients=(1, 2), rounds=1, min_requests=2, max_tokens=4, time_cap_s=30, peers=()),
    cluster=ClusterSettings(
        clients=2,
        requests=4,
        max_tokens=3,
        per_task=1,
        time_cap_s=60,
        configurations=("fifo", "switch-aware"),
    ),
    fidelity_args=("--limit", "2", "--seeds", "0", "--keeps", "0.5"),
    retrieval_args=(
        "--sizes",
        "200",
        "--latency-queries",
        "4",
        "--latency-batch-sizes",
        "1",
        "--kinds",
        "flat",
        "--keeps",
        "0.5",
        "--limit",
        "2",
    ),
    store_args=("--experts", "8", "--hidden", "64", "--intermediate", "32", "--layers", "2"),
    api_args=("--quick",),
    discover_args=("--splits", "calibration", "--seeds", "0", "--keeps", "0.5", "--limit", "2"),
)


@dataclass(slots=True)
class Section:
    key: str
    title: str
    markdown: str = ""
    figures: list[str] = field(default_factory=list)
    targets: list[dict] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0


def run_section(section: Section, fn: Callable[[Section], None]) -> Section:
    """Run one section; a failure is written into the report instead of ending the run."""
    start = time.perf_counter()
    try:
        fn(section)
    except Exception as error:  # any failure of one benchmark must not lose the others' results
        logger.exception("section %s failed", section.key)
        where = traceback.extract_tb(error.__traceback__)[-1]
        section.error = f"{type(error).__name__}: {error} ({Path(where.filename).name}:{where.lineno})"
    section.seconds = time.perf_counter() - start
    return section


def run_external(module_name: str, argv: Sequence[str], fallback_argv: Sequence[str]) -> str:
    """Another benchmark's ``add_arguments``/``main``, its printed output returned. Arguments it
    rejects are retried with ``fallback_argv`` (its defaults for everything else)."""
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=module_name)
    module.add_arguments(parser)
    try:
        args = parser.parse_args(list(argv))
    except SystemExit:
        logger.warning("%s rejected %s; running it with its defaults", module_name, list(argv))
        args = parser.parse_args(list(fallback_argv))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = module.main(args)
    if code:
        raise RuntimeError(f"{module_name} exited with {code}")
    return printed.getvalue()


class ReportRun:
    """Builds each section into ``out``."""

    def __init__(
        self, out: Path, data: Path, inputs: BenchInputs, sizes: ReportSizes, explicit: bool
    ) -> None:
        from benchmarks.policies import interleaved_prompts

        self.out, self.data, self.inputs, self.sizes, self.explicit = out, data, inputs, sizes, explicit
        self.prompts = interleaved_prompts(inputs.tasks, sizes.per_task)

    def policies(self, section: Section) -> None:
        from benchmarks import plots, policies, policies_render

        result = policies.run_policies(
            self.inputs.store,
            self.inputs.patterns,
            self.prompts,
            self.sizes.keeps,
            self.sizes.max_new_tokens,
            self.sizes.threads,
        )
        write_json(self.out / "policies.json", result)
        section.figures.append(plots.plot_policies(result, self.out / "policies.png").name)
        section.markdown, section.targets = policies_render.render(result), result["targets"]

    def server(self, section: Section) -> None:
        from benchmarks import plots, serving

        result = serving.run_server_comparison(
            self.inputs, self.prompts, self.sizes.serving, self.out / "server-logs"
        )
        write_json(self.out / "serving.json", result)
        section.figures.append(plots.plot_servers(result, self.out / "serving.png").name)
        section.markdown, section.targets = serving.render_servers(result), result["targets"]

    def cluster(self, section: Section) -> None:
        from benchmarks import cluster

        result = cluster.run_cluster(self.inputs, self.prompts, self.sizes.cluster, self.out / "cluster-logs")
        write_json(self.out / "cluster.json", result)
        section.markdown, section.targets = cluster.render(result), result["targets"]

    def memory(self, section: Section) -> None:
        from benchmarks import memory, plots

        result = memory.run_memory(self.inputs.store, self.inputs.patterns, self.inputs.checkpoint)
        write_json(self.out / "memory.json", result)
        section.figures.append(plots.plot_memory(result, self.out / "memory.png").name)
        section.markdown = memory.render(result)

    def external(self, name: str, extra: Sequence[str]) -> Callable[[Section], None]:
        def run(section: Section) -> None:
            common = ["--out", str(self.out), "--data", str(self.data)]
            if self.explicit:
                common += [
                    "--store",
                    str(self.inputs.store),
                    "--patterns",
                    str(self.inputs.patterns),
                    "--tasks",
                    str(self.inputs.tasks),
                ]
            printed = run_external(f"benchmarks.{name}", [*common, *extra], common)
            written = self.out / f"{name}.md"
            section.markdown = written.read_text() if written.exists() else printed
            result = _read_json(self.out / f"{name}.json")
            section.targets = list(result.get("targets", []))
            section.figures += [p.name for p in sorted(self.out.glob("*.png")) if _belongs_to(p.name, name)]

        return run

    def store(self, section: Section) -> None:
        argv = [
            "--json",
            str(self.out / "store.json"),
            "--work",
            str(self.data / "bench-store"),
            *self.sizes.store_args,
        ]
        section.markdown = run_external("benchmarks.store", argv, argv[:4])


def _belongs_to(figure: str, name: str) -> bool:
    return figure.startswith(name) or (name == "fidelity" and figure.startswith("tcess"))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


TITLES = {
    "policies": "1. Policies at equal expert memory (demo model, same prompts)",
    "server": "2. Server vs peer: taer serve vs transformers serve, same workload",
    "cluster": "2b. Mixed traffic: one replica (fifo, switch-aware) and two on Ray Serve, equal expert memory",
    "memory": "3. Memory at keep 100/50/25%",
    "fidelity": "4a. Fidelity: pruned vs full accuracy",
    "retrieval": "4b. Retrieval: accuracy, latency, end to end",
    "store": "5. Expert store: load throughput, pattern switches (synthetic checkpoint)",
    "api": "6. API features: constrained decoding per token, n samples vs n requests",
    "discover": "7. Task discovery: clusters of the demo's unlabelled prompts vs its tasks, and their patterns",
}


def build_report(
    out: Path,
    data: Path,
    inputs: BenchInputs,
    sizes: ReportSizes,
    sections: Sequence[str],
    explicit: bool = False,
) -> Path:
    """Run ``sections`` and write ``out``/report.md; returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    started, clock = machine_info(), time.perf_counter()
    started["load_average"] = [round(x, 2) for x in os.getloadavg()]
    run = ReportRun(out, data, inputs, sizes, explicit)
    runners = {
        "policies": run.policies,
        "server": run.server,
        "cluster": run.cluster,
        "memory": run.memory,
        "fidelity": run.external("fidelity", sizes.fidelity_args),
        "retrieval": run.external("retrieval", sizes.retrieval_args),
        "store": run.store,
        "api": run.external("api_features", sizes.api_args),
        "discover": run.external("discover", sizes.discover_args),
    }
    done = []
    for key in sections:
        logger.info("report: running %s", key)
        done.append(run_section(Section(key, TITLES[key]), runners[key]))
    total = time.perf_counter() - clock
    write_json(
        out / "report.json",
        {
            "machine": started,
            "seconds": total,
            "inputs": {k: str(v) for k, v in vars_of(inputs).items()},
            "sections": [_section_json(s) for s in done],
        },
    )
    path = out / "report.md"
    from benchmarks.report_text import render_report

    path.write_text(render_report(started, total, inputs, sizes, done))
    return path


def vars_of(inputs: BenchInputs) -> dict:
    return {
        "store": inputs.store,
        "patterns": inputs.patterns,
        "checkpoint": inputs.checkpoint,
        "tasks": inputs.tasks,
    }


def _section_json(section: Section) -> dict:
    return {
        "key": section.key,
        "seconds": section.seconds,
        "error": section.error,
        "figures": section.figures,
        "targets": section.targets,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="report directory")
    parser.add_argument("--data", type=Path, default=Path(".taer"), help="demo model, store and patterns")
    parser.add_argument(
        "--store", type=Path, help="another store instead of the demo (with --patterns, --tasks)"
    )
    parser.add_argument("--patterns", type=Path)
    parser.add_argument("--tasks", type=Path, help="tasks.yaml with labelled eval prompts")
    parser.add_argument(
        "--checkpoint", type=Path, help="the plain checkpoint of --store (memory, peer server)"
    )
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes (a smoke run in seconds), no peer server"
    )


def main(args: argparse.Namespace) -> int:
    from benchmarks.serving import resolve_inputs

    logging.getLogger("httpx").setLevel(logging.WARNING)
    sections = [s for s in args.sections.split(",") if s]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise TaerError(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    explicit = args.store is not None
    inputs = resolve_inputs(args.data, args.store, args.patterns, args.checkpoint, args.tasks)
    sizes = QUICK if args.quick else ReportSizes()
    path = build_report(args.out, args.data, inputs, sizes, sections, explicit)
    print(path.read_text())
    print(f"wrote {path}")
    return 0
