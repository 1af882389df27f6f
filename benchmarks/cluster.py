"""`taer bench cluster`: mixed traffic against one or more serving configurations.

Mixed traffic is the demo's tasks drawn at random (seeded) for a fixed number of streaming chat
requests, sent by 16 closed-loop clients. Each configuration is a named launcher that builds the
``ServerSpec`` of a server on 127.0.0.1; the configurations run one after another on the same
requests. Per configuration the report gives tokens/s, TTFT p50/p99, pattern switches per 100
requests and expert bytes loaded per request (the server's own ``/metrics``, read before and after
the run; a cluster sums its replicas'), requests lost (sent minus completed), and a *projection* of the run's time on a GPU box:
the measured wall time plus the bytes loaded over a 25 or 50 GB/s host-to-device link. The measured
time here is this machine's (CPU) and already includes copying experts in host memory, so the
projection is an upper bound on what the link adds, not a GPU measurement.

Every configuration has the same total expert memory: two replicas each get the slots of one
pattern (``keep`` of each layer's experts) unless ``replica_slots`` says otherwise, one replica gets
twice that on its one device (at most every expert), so that it can hold two disjoint patterns at
once. Two replicas get one torch thread each, one replica the
server's default: the same cores either way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from benchmarks.common import machine_info, markdown_table, write_json
from benchmarks.loadgen import Workload, run_load
from benchmarks.policies import BenchPrompt, interleaved_prompts
from benchmarks.servers import ServerProcess, ServerSpec, free_port, taer_spec
from benchmarks.serving import BenchInputs, resolve_inputs, taer_bodies
from expert_store.errors import TaerError

logger = logging.getLogger(__name__)

LINKS_GB_S = (25.0, 50.0)
SWITCHES = "taer_pattern_switches_total"
LOAD_BYTES = "taer_expert_load_bytes_total"


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    clients: int = 16
    requests: int = 96
    max_tokens: int = 16
    keep: float = 0.25  # each task's share of each layer's experts
    replica_slots: int | None = None  # slots per layer of a replica of two; None: one pattern's
    per_task: int = 8  # distinct prompts per task to draw from
    seed: int = 0
    time_cap_s: float = 600.0
    device: str = "cpu"
    threads: int | None = None
    configurations: tuple[str, ...] = (
        "fifo",
        "switch-aware",
        "replicas-ray-default",
        "replicas-task-affinity",
        "replicas-task-affinity-switch-aware",
    )


Launcher = Callable[[BenchInputs, ClusterSettings], ServerSpec]


def replica_slots(store: Path, settings: ClusterSettings) -> tuple[int, int]:
    """(slots per layer of a replica of two, experts per layer): ``settings.replica_slots``, or
    those of one pattern keeping ``keep`` of each layer's experts."""
    from expert_store.store import ExpertStore
    from retrieval.selection import Budget

    opened = ExpertStore(store)
    try:
        experts = opened.layout.num_experts
    finally:
        opened.close()
    return settings.replica_slots or Budget(keep=settings.keep).per_layer(experts), experts


def one_replica(scheduler: str) -> Launcher:
    """One `taer serve` with the given ``--scheduler`` and the slots of two patterns."""

    def launch(inputs: BenchInputs, settings: ClusterSettings) -> ServerSpec:
        spec = taer_spec(
            inputs.store, inputs.patterns, settings.keep, free_port(), settings.device, settings.threads
        )
        half, experts = replica_slots(inputs.store, settings)
        slots = min(2 * half, experts)  # every expert resident at most
        label = f"one taer serve, {scheduler} scheduler ({slots} slots/layer)"
        flags = ["--scheduler", scheduler, "--slots-per-layer", str(slots)]
        return replace(spec, name=scheduler, label=label, command=[*spec.command, *flags])

    return launch


def two_replicas(routing: str, scheduler: str = "fifo") -> Launcher:
    """`taer serve --replicas 2` on a local Ray instance, with ``--replica-routing`` and each
    replica's ``--scheduler``: each replica has the slots of one pattern and one CPU thread."""
    name = f"replicas-{routing}" + ("" if scheduler == "fifo" else f"-{scheduler}")

    def launch(inputs: BenchInputs, settings: ClusterSettings) -> ServerSpec:
        spec = taer_spec(inputs.store, inputs.patterns, settings.keep, free_port(), settings.device, 1)
        slots, _ = replica_slots(inputs.store, settings)
        label = f"two replicas on Ray Serve, {routing} routing, {scheduler} ({slots} slots/layer each)"
        flags = ["--replicas", "2", "--replica-routing", routing, "--slots-per-layer", str(slots)]
        flags += ["--scheduler", scheduler]
        return replace(spec, name=name, label=label, command=[*spec.command, *flags])

    return launch


LAUNCHERS: dict[str, Launcher] = {
    "fifo": one_replica("fifo"),
    "replicas-ray-default": two_replicas("ray-default"),
    "replicas-task-affinity": two_replicas("task-affinity"),
    "replicas-ray-default-switch-aware": two_replicas("ray-default", "switch-aware"),
    "replicas-task-affinity-switch-aware": two_replicas("task-affinity", "switch-aware"),
    "switch-aware": one_replica("switch-aware"),
}


def mixed_bodies(prompts: Sequence[BenchPrompt], settings: ClusterSettings) -> Callable[[str], list[dict]]:
    """One body per request: a prompt of a task drawn at random (seeded), the same for every server."""
    rng = random.Random(settings.seed)
    by_task: dict[str, list[BenchPrompt]] = {}
    for prompt in prompts:
        by_task.setdefault(prompt.task, []).append(prompt)
    tasks = sorted(by_task)
    drawn = [rng.choice(by_task[rng.choice(tasks)]) for _ in range(settings.requests)]
    return taer_bodies(drawn, settings.max_tokens)


def read_counters(base_url: str) -> dict[str, float]:
    """The pattern-switch and expert-bytes counters from ``/metrics`` (summed over labels)."""
    with httpx.Client(trust_env=False, timeout=10) as client:
        text = client.get(f"{base_url}/metrics").text
    totals = {SWITCHES: 0.0, LOAD_BYTES: 0.0}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


def settled_counters(base_url: str, deadline_s: float = 15.0) -> dict[str, float]:
    """The counters once two reads 1.5 s apart agree: a cluster's replicas report them every second."""
    deadline = time.monotonic() + deadline_s
    counters = read_counters(base_url)
    while time.monotonic() < deadline:
        time.sleep(1.5)
        again = read_counters(base_url)
        if again == counters:
            break
        counters = again
    return counters


def measure(
    spec: ServerSpec, make_bodies: Callable[[str], list[dict]], settings: ClusterSettings, log_dir: Path
) -> dict:
    """Start one configuration, warm it up, run the traffic, and read its counters around the run."""
    entry: dict = {"name": spec.name, "label": spec.label}
    try:
        with ServerProcess(spec, log_dir / f"{spec.name}.log") as server:
            bodies = make_bodies(server.model_id())
            asyncio.run(run_load(spec.base_url, Workload(bodies[:2], "/v1/chat/completions", 1, 2)))
            before = read_counters(spec.base_url)
            workload = Workload(
                bodies, "/v1/chat/completions", settings.clients, settings.requests, settings.time_cap_s
            )
            result = asyncio.run(run_load(spec.base_url, workload))
            after = settled_counters(spec.base_url)
    except (RuntimeError, OSError, httpx.HTTPError) as error:
        logger.warning("%s: %s", spec.name, error)
        return entry | {"error": str(error)}
    return entry | figures(result.summary(), {k: after[k] - before[k] for k in after}, settings)


def figures(summary: dict, counters: dict[str, float], settings: ClusterSettings) -> dict:
    """The report's figures for one configuration, from the load's summary and the counters' deltas."""
    sent, completed = settings.requests, summary["completed"]
    per_request = max(completed, 1)
    projection = {
        f"{link:g}GB/s": project(summary["wall_s"], counters[LOAD_BYTES], summary["completion_tokens"], link)
        for link in LINKS_GB_S
    }
    return {
        "load": summary,
        "tokens_per_s": summary["throughput_tokens_per_s"],
        "ttft_ms_p50": summary["ttft_ms_p50"],
        "ttft_ms_p99": summary["ttft_ms_p99"],
        "switches_per_100_requests": 100 * counters[SWITCHES] / per_request,
        "expert_bytes_per_request": counters[LOAD_BYTES] / per_request,
        "pattern_switches": counters[SWITCHES],
        "expert_bytes_loaded": counters[LOAD_BYTES],
        "requests_lost": sent - completed,
        "projection": projection,
    }


def project(wall_s: float, bytes_loaded: float, tokens: int, link_gb_s: float) -> dict:
    """Projection, not a measurement: the measured time plus the expert bytes over the link."""
    seconds = wall_s + bytes_loaded / (link_gb_s * 1e9)
    return {"seconds": seconds, "tokens_per_s": tokens / seconds if seconds > 0 else 0.0}


def run_cluster(
    inputs: BenchInputs, prompts: Sequence[BenchPrompt], settings: ClusterSettings, log_dir: Path
) -> dict:
    """Every configuration in turn on the same seeded mixed traffic."""
    unknown = [c for c in settings.configurations if c not in LAUNCHERS]
    if unknown:
        raise TaerError(f"unknown configuration(s) {unknown}; choose from {', '.join(LAUNCHERS)}")
    make_bodies = mixed_bodies(prompts, settings)
    entries = []
    for name in settings.configurations:
        spec = LAUNCHERS[name](inputs, settings)
        entries.append(measure(spec, make_bodies, settings, log_dir))
        logger.info("%s: %s", name, entries[-1].get("tokens_per_s", entries[-1].get("error")))
    result = {
        "settings": {
            "clients": settings.clients,
            "requests": settings.requests,
            "max_tokens": settings.max_tokens,
            "keep": settings.keep,
            "replica_slots": replica_slots(inputs.store, settings)[0],
            "seed": settings.seed,
            "tasks": len({p.task for p in prompts}),
            "device": settings.device,
        },
        "configurations": entries,
    }
    result["targets"] = cluster_targets(entries)
    return result


def cluster_targets(entries: list[dict]) -> list[dict]:
    """task affinity: at most a third of Ray's default routing's expert bytes per request;
    switch-aware: at most half of fifo's switches per 100 requests at equal or better TTFT p99;
    no configuration loses a request."""
    by_name = {e["name"]: e for e in entries if "error" not in e}
    checks = []
    default = by_name.get("replicas-ray-default")
    for name in ("replicas-task-affinity", "replicas-task-affinity-switch-aware"):
        affinity = by_name.get(name)
        if not (default and affinity):
            continue
        ratio = affinity["expert_bytes_per_request"] / max(default["expert_bytes_per_request"], 1e-9)
        checks.append(
            {
                "target": f"{name}: expert bytes per request <= 1/3 of replicas-ray-default's",
                "measured": ratio,
                "bound": 1 / 3,
                "met": ratio <= 1 / 3,
            }
        )
    fifo, aware = by_name.get("fifo"), by_name.get("switch-aware")
    if fifo and aware:
        ratio = aware["switches_per_100_requests"] / max(fifo["switches_per_100_requests"], 1e-9)
        checks.append(
            {
                "target": "switch-aware switches per 100 requests <= 0.5x fifo's",
                "measured": ratio,
                "bound": 0.5,
                "met": ratio <= 0.5,
            }
        )
        ttft = aware["ttft_ms_p99"] / max(fifo["ttft_ms_p99"], 1e-9)
        checks.append(
            {"target": "switch-aware TTFT p99 <= fifo's", "measured": ttft, "bound": 1.0, "met": ttft <= 1.0}
        )
    for entry in entries:
        lost = entry.get("requests_lost")
        checks.append(
            {
                "target": f"{entry['name']}: no request lost",
                "measured": lost,
                "bound": 0,
                "met": lost == 0,
                **({"note": entry["error"]} if "error" in entry else {}),
            }
        )
    return checks


def render(result: dict) -> str:
    s = result["settings"]
    links = [f"{link:g}GB/s" for link in LINKS_GB_S]
    rows = []
    for e in result["configurations"]:
        if "error" in e:
            rows.append([e["label"], "failed: " + e["error"][:160]] + ["-"] * (5 + len(links)))
            continue
        rows.append(
            [
                e["label"],
                e["tokens_per_s"],
                e["ttft_ms_p50"],
                e["ttft_ms_p99"],
                e["switches_per_100_requests"],
                e["expert_bytes_per_request"] / 1e6,
                e["requests_lost"],
                *(e["projection"][link]["tokens_per_s"] for link in links),
            ]
        )
    headers = [
        "configuration",
        "tokens/s",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "switches /100 req",
        "expert MB /req",
        "lost",
        *(f"projection: tokens/s at {link}" for link in links),
    ]
    intro = (
        f"{s['requests']} streaming chat requests, tasks drawn at random (seed {s['seed']}) from "
        f"{s['tasks']} tasks, {s['clients']} closed-loop clients, {s['max_tokens']} tokens each, keep "
        f"{s['keep']:.0%}, device {s['device']}. Equal total expert memory: each of two replicas has "
        f"{s['replica_slots']} expert slots per layer, one replica twice that (at most every "
        "expert). Measured times are this machine's; the projection columns (a projection, not a "
        "measurement) add the expert bytes loaded over a host-to-device link to the measured time.\n"
    )
    return intro + markdown_table(headers, rows)


def render_targets(targets: list[dict]) -> str:
    rows = [
        [
            t["target"],
            "-" if t["measured"] is None else t["measured"],
            t["bound"],
            "met" if t["met"] else "MISSED",
        ]
        for t in targets
    ]
    return markdown_table(["target", "measured", "bound", ""], rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", type=Path, default=Path(".taer"), help="demo data directory (default .taer)"
    )
    parser.add_argument("--store", type=Path, help="a store (instead of the demo's)")
    parser.add_argument("--patterns", type=Path, help="its patterns directory")
    parser.add_argument("--tasks", type=Path, help="tasks.yaml with labelled eval prompts")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="writes cluster.json here")
    parser.add_argument("--configurations", default=",".join(LAUNCHERS), help="comma list of configurations")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument(
        "--keep", type=float, default=0.25, help="each task's share of each layer's experts (default 0.25)"
    )
    parser.add_argument(
        "--replica-slots",
        type=int,
        help="expert slots per layer of each of two replicas (one replica gets twice); default: one pattern's",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads per server")


def settings_from(args: argparse.Namespace) -> ClusterSettings:
    return ClusterSettings(
        clients=args.clients,
        requests=args.requests,
        max_tokens=args.max_tokens,
        keep=args.keep,
        replica_slots=args.replica_slots,
        seed=args.seed,
        threads=args.threads,
        configurations=tuple(c for c in args.configurations.split(",") if c),
    )


def main(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    inputs = resolve_inputs(args.data, args.store, args.patterns, None, args.tasks)
    settings = settings_from(args)
    prompts = interleaved_prompts(inputs.tasks, settings.per_task)
    with contextlib.suppress(FileExistsError):
        args.out.mkdir(parents=True)
    result = run_cluster(inputs, prompts, settings, args.out / "cluster-logs")
    result["machine"] = machine_info()
    write_json(args.out / "cluster.json", result)
    print("## Mixed traffic, one engine and more\n\n" + render(result))
    print("\n" + render_targets(result["targets"]))
    return 0
