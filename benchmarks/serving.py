"""`taer bench serving`: policies at equal expert memory, and `taer serve` against a peer server.

The server comparison (part 2 of `taer bench all`) runs one workload -- fixed prompts, 1, 4 and 8
concurrent streaming clients, a fixed number of generated tokens per request -- against each server
on 127.0.0.1: `taer serve` on the store, and `transformers serve` on the plain checkpoint the store
was sharded from (its default sequential mode and its continuous batching). The servers run side by
side and are measured in turn at each level, so background load falls on all alike (or one at a
time, ``--one-at-a-time``, for a model too large to hold twice).

Both servers get the same prompt tokens and generate exactly ``max_tokens`` tokens (taer with
``ignore_eos``, the peer with ``eos_token_id = -1``, its own "no eos" value). taer is asked through
``/v1/chat/completions``; the peer through ``/v1/completions`` with the prompt rendered by the same
chat template, because its chat endpoint parses Qwen3-MoE replies with a ChatML template that a
checkpoint with another chat format does not match (it then streams the prompt back as content).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.common import machine_info, markdown_table, write_json
from benchmarks.loadgen import Workload, run_load
from benchmarks.policies import BenchPrompt, interleaved_prompts
from benchmarks.servers import ServerProcess, ServerSpec, free_port, peer_missing, peer_spec, taer_spec
from expert_store.errors import TaerError

logger = logging.getLogger(__name__)

PEERS = {"default": False, "cb": True}  # name -> continuous batching


@dataclass(frozen=True, slots=True)
class BenchInputs:
    """The demo (or any) model in its three forms, and its task suite."""

    store: Path
    patterns: Path
    checkpoint: Path | None
    tasks: Path


@dataclass(frozen=True, slots=True)
class ServingSettings:
    clients: tuple[int, ...] = (1, 4, 8)
    rounds: int = 3  # requests per level = max(min_requests, rounds * clients)
    min_requests: int = 8
    max_tokens: int = 32
    keep: float = 0.5
    time_cap_s: float = 120.0
    peers: tuple[str, ...] = ("default", "cb")
    # Also taer with every expert resident (keep 100%): the engine at the peers' expert memory, so
    # that batching is compared apart from what fitting one task's experts costs.
    all_experts: bool = True
    device: str = "cpu"
    threads: int | None = None
    interleave: bool = True  # all servers up at once, measured in turn at each level

    def requests(self, clients: int) -> int:
        return max(self.min_requests, self.rounds * clients)


def resolve_inputs(
    data: Path,
    store: Path | None = None,
    patterns: Path | None = None,
    checkpoint: Path | None = None,
    tasks: Path | None = None,
) -> BenchInputs:
    """Explicit paths, or the demo under ``data`` (built, sharded, calibrated and indexed if missing)."""
    if store is None or patterns is None:
        from demo.prepare import DemoPaths, prepare_demo

        prepared = prepare_demo(DemoPaths.under(data))
        store, patterns = prepared.store, prepared.patterns
        checkpoint = checkpoint or prepared.model_dir
        tasks = tasks or prepared.tasks_file
    if tasks is None:
        raise TaerError("give --tasks (a tasks.yaml with labelled eval prompts) with --store and --patterns")
    return BenchInputs(Path(store), Path(patterns), checkpoint and Path(checkpoint), Path(tasks))


def taer_bodies(prompts: Sequence[BenchPrompt], max_tokens: int) -> Callable[[str], list[dict]]:
    def make(model: str) -> list[dict]:
        return [
            {
                "model": model,
                "messages": p.chat(),
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
                "stream_options": {"include_usage": True},
            }
            for p in prompts
        ]

    return make


def peer_bodies(prompts: Sequence[BenchPrompt], max_tokens: int, tokenizer) -> Callable[[str], list[dict]]:
    config = json.dumps({"eos_token_id": -1, "do_sample": False})
    texts = [
        tokenizer.apply_chat_template(p.chat(), add_generation_prompt=True, tokenize=False) for p in prompts
    ]

    def make(model: str) -> list[dict]:
        return [
            {"model": model, "prompt": t, "max_tokens": max_tokens, "generation_config": config}
            for t in texts
        ]

    return make


@dataclass(slots=True)
class Contender:
    """One server in the comparison: how to start it, what to send it, and what it measured."""

    spec: ServerSpec
    make_bodies: Callable[[str], list[dict]]
    path: str
    entry: dict
    server: ServerProcess | None = None
    bodies: list[dict] | None = None

    def start(self, stack: contextlib.ExitStack, settings: ServingSettings, log_dir: Path) -> None:
        """Start, find the model name, warm up (the peer builds its batching on the first request)."""
        try:
            server = stack.enter_context(ServerProcess(self.spec, log_dir / f"{self.spec.name}.log"))
            bodies = self.make_bodies(server.model_id())
            self.entry |= {"startup_s": server.startup_s, "idle_rss_bytes": server.memory()["rss_bytes"]}
            warmup = asyncio.run(
                run_load(self.spec.base_url, Workload(bodies[:2], self.path, 1, 2, settings.time_cap_s))
            )
            if warmup.completed < 2:
                raise RuntimeError(f"warm-up failed: {warmup.summary()['errors']} {server.log_tail(600)}")
        except (RuntimeError, OSError, httpx.HTTPError) as error:
            logger.warning("%s: %s", self.spec.name, error)
            self.entry["error"] = str(error)
            return
        self.server, self.bodies, self.entry["levels"] = server, bodies, []

    def measure(self, clients: int, settings: ServingSettings) -> None:
        if self.server is None:
            return
        workload = Workload(self.bodies, self.path, clients, settings.requests(clients), settings.time_cap_s)
        result = asyncio.run(run_load(self.spec.base_url, workload))
        self.entry["levels"].append(result.summary() | {"rss_bytes": self.server.memory()["rss_bytes"]})
        logger.info("%s, %d client(s): %.1f tokens/s", self.spec.name, clients, result.throughput)

    def finish(self) -> None:
        if self.server is not None:
            self.entry["peak_rss_bytes"] = self.server.memory()["peak_rss_bytes"]


def contenders(
    inputs: BenchInputs, prompts: Sequence[BenchPrompt], settings: ServingSettings
) -> list[Contender]:
    """taer serve, then each peer configuration (or the reason it cannot run)."""
    spec = taer_spec(
        inputs.store, inputs.patterns, settings.keep, free_port(), settings.device, settings.threads
    )
    chat = "/v1/chat/completions"
    found = [Contender(spec, taer_bodies(prompts, settings.max_tokens), chat, _entry(spec, chat))]
    if settings.all_experts and settings.keep < 1:
        full = taer_spec(
            inputs.store,
            inputs.patterns,
            1.0,
            free_port(),
            settings.device,
            settings.threads,
            name="taer-all",
        )
        found.append(Contender(full, taer_bodies(prompts, settings.max_tokens), chat, _entry(full, chat)))
    reason = peer_missing() if inputs.checkpoint is not None else "no plain checkpoint given"
    for peer in settings.peers:
        pspec = peer_spec(
            inputs.checkpoint or Path("-"), free_port(), PEERS[peer], settings.device, settings.threads
        )
        if reason is not None:
            found.append(
                Contender(
                    pspec, lambda model: [], "", {"name": pspec.name, "label": pspec.label, "error": reason}
                )
            )
            continue
        from transformers import AutoTokenizer

        bodies = peer_bodies(prompts, settings.max_tokens, AutoTokenizer.from_pretrained(inputs.checkpoint))
        found.append(Contender(pspec, bodies, "/v1/completions", _entry(pspec, "/v1/completions")))
    return found


def _entry(spec: ServerSpec, path: str) -> dict:
    return {"name": spec.name, "label": spec.label, "path": path}


def run_server_comparison(
    inputs: BenchInputs, prompts: Sequence[BenchPrompt], settings: ServingSettings, log_dir: Path
) -> dict:
    """Every server on the same workload. Interleaved (the default): all servers up at once, and at
    each concurrency level each is measured in turn, so background load on the machine falls on all
    of them alike; otherwise one server at a time (for models too large to hold twice)."""
    everyone = contenders(inputs, prompts, settings)
    runnable = [c for c in everyone if "error" not in c.entry]
    groups = [runnable] if settings.interleave else [[c] for c in runnable]
    for group in groups:
        with contextlib.ExitStack() as stack:
            for contender in group:
                contender.start(stack, settings, log_dir)
            for clients in settings.clients:
                for contender in group:
                    contender.measure(clients, settings)
            for contender in group:
                contender.finish()
    result = {
        "settings": {
            "clients": list(settings.clients),
            "max_tokens": settings.max_tokens,
            "keep": settings.keep,
            "requests": {str(c): settings.requests(c) for c in settings.clients},
            "time_cap_s": settings.time_cap_s,
            "device": settings.device,
            "prompts": len(prompts),
            "torch_threads": settings.threads or "default",
            "interleaved": settings.interleave,
        },
        "servers": [c.entry for c in everyone],
    }
    result["targets"] = server_targets(result)
    return result


def server_targets(result: dict) -> list[dict]:
    """taer >= 2x each peer's throughput at the most clients (taer's other configurations are not peers)."""
    servers = {s["name"]: s for s in result["servers"]}
    taer = servers.get("taer", {})
    checks = []
    for name, peer in servers.items():
        if name.startswith("taer"):
            continue
        target = f"taer >= 2x {peer['label']} throughput at {max(result['settings']['clients'])} clients"
        if "levels" not in taer or "levels" not in peer:
            checks.append(
                {
                    "target": target,
                    "measured": None,
                    "bound": 2.0,
                    "met": False,
                    "note": peer.get("error") or taer.get("error"),
                }
            )
            continue
        ratio = taer["levels"][-1]["throughput_tokens_per_s"] / max(
            peer["levels"][-1]["throughput_tokens_per_s"], 1e-9
        )
        checks.append({"target": target, "measured": ratio, "bound": 2.0, "met": ratio >= 2.0})
    return checks


def render_servers(result: dict) -> str:
    s = result["settings"]
    taer = next((x for x in result["servers"] if x["name"] == "taer" and "levels" in x), None)
    rows, memory = [], []
    for server in result["servers"]:
        if "levels" not in server:
            rows.append([server["label"], "-", "failed: " + server.get("error", "?")[:160]] + ["-"] * 7)
            continue
        for i, level in enumerate(server["levels"]):
            ratio = (
                taer["levels"][i]["throughput_tokens_per_s"] / max(level["throughput_tokens_per_s"], 1e-9)
                if taer
                else None
            )
            rows.append(
                [
                    server["label"],
                    level["clients"],
                    f"{level['completed']}/{level['sent']}",
                    level["throughput_tokens_per_s"],
                    "-" if ratio is None else f"{ratio:.2f}x",
                    level["ttft_ms_p50"],
                    level["ttft_ms_p99"],
                    level["latency_ms_p50"],
                    level["latency_ms_p99"],
                    level["rss_bytes"] / 1e6,
                ]
            )
        memory.append(
            [
                server["label"],
                server["startup_s"],
                server["idle_rss_bytes"] / 1e6,
                server["peak_rss_bytes"] / 1e6,
            ]
        )
    parts = [
        f"{s['prompts']} prompts cycled, exactly {s['max_tokens']} generated tokens per request, requests per level "
        f"{s['requests']}, time cap {s['time_cap_s']:.0f} s per level, device {s['device']}, torch threads "
        f"{s['torch_threads']}; all on 127.0.0.1; "
        + (
            "servers up together, measured in turn at each level"
            if s.get("interleaved")
            else "one server at a time"
        )
        + ". Times are this machine's.\n",
        markdown_table(
            [
                "server",
                "clients",
                "done/sent",
                "tokens/s",
                "taer ÷ this",
                "TTFT p50 ms",
                "TTFT p99 ms",
                "latency p50 ms",
                "latency p99 ms",
                "RSS MB",
            ],
            rows,
        ),
    ]
    if memory:
        parts += ["\n" + markdown_table(["server", "startup s", "RSS after load MB", "peak RSS MB"], memory)]
    return "\n".join(parts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", type=Path, default=Path(".taer"), help="demo data directory (default .taer)"
    )
    parser.add_argument("--store", type=Path, help="a store (instead of the demo's)")
    parser.add_argument("--patterns", type=Path, help="its patterns directory")
    parser.add_argument(
        "--checkpoint", type=Path, help="the plain checkpoint the store came from (for the peer)"
    )
    parser.add_argument("--tasks", type=Path, help="tasks.yaml with labelled eval prompts")
    parser.add_argument("--parts", default="policies,server", help="comma list of policies, server")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--per-task", type=int, default=8, help="eval prompts per task")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="policies: cap on new tokens")
    parser.add_argument(
        "--keeps", default="0.5,0.25", help="policies: expert memory as fractions of the experts"
    )
    parser.add_argument("--threads", type=int, default=1, help="policies: torch threads")
    parser.add_argument("--clients", default="1,4,8", help="server: concurrency levels")
    parser.add_argument("--max-tokens", type=int, default=32, help="server: tokens generated per request")
    parser.add_argument("--keep", type=float, default=0.5, help="server: taer serve --keep")
    parser.add_argument("--peers", default="default,cb", help="server: peer modes (default, cb), or none")
    parser.add_argument(
        "--no-all-experts",
        action="store_true",
        help="server: skip the second taer serve with every expert resident",
    )
    parser.add_argument("--time-cap", type=float, default=120.0, help="server: seconds per concurrency level")
    parser.add_argument(
        "--one-at-a-time",
        action="store_true",
        help="server: run each server alone (for models too large to hold twice)",
    )
    parser.add_argument("--work", type=Path, default=Path(".taer/bench-serving"), help="server logs")


def settings_from(args: argparse.Namespace) -> ServingSettings:
    peers = tuple(p for p in args.peers.split(",") if p and p != "none")
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise TaerError(f"unknown peer mode(s) {unknown}; use {', '.join(PEERS)} or none")
    return ServingSettings(
        clients=tuple(int(c) for c in args.clients.split(",")),
        max_tokens=args.max_tokens,
        keep=args.keep,
        time_cap_s=args.time_cap,
        peers=peers,
        interleave=not args.one_at_a_time,
        all_experts=not args.no_all_experts,
    )


def main(args: argparse.Namespace) -> int:
    from benchmarks import policies, policies_render

    inputs = resolve_inputs(args.data, args.store, args.patterns, args.checkpoint, args.tasks)
    prompts = interleaved_prompts(inputs.tasks, args.per_task)
    parts = set(args.parts.split(","))
    result: dict = {"machine": machine_info()}
    if "policies" in parts:
        keeps = tuple(float(k) for k in args.keeps.split(","))
        result["policies"] = policies.run_policies(
            inputs.store, inputs.patterns, prompts, keeps, args.max_new_tokens, args.threads
        )
        print("## Policies at equal expert memory\n\n" + policies_render.render(result["policies"]))
    if "server" in parts:
        result["server"] = run_server_comparison(inputs, prompts, settings_from(args), args.work)
        print("\n## taer serve vs peer\n\n" + render_servers(result["server"]))
        print("\n" + policies_render.render_targets(result["server"]["targets"]))
    write_json(args.json, result)
    return 0
