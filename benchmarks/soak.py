"""`taer bench soak`: many concurrent clients for a long run against a real `taer serve`.

Closed-loop clients send greedy requests over every generation route (chat and completions,
streamed or not; TGI ``/generate`` and ``/generate_stream``), mixing the tasks' prompts (seeded). A
tenth of the clients cut each of their streams after its first event, and some requests carry a
client deadline (the client gives up and closes the connection when it passes). The run checks:

- every completed response equals the answer the same request gets alone (sent one at a time before
  the run, non-streamed: a stream must give the same text as the plain response);
- none lost, none duplicated: every request ends (completed, cut on purpose, past its deadline); the
  server's own count of requests per route grows by the number sent, less at most the requests
  whose client gave up (one given up before its bytes left may never reach the server); no response
  id is seen twice;
- the in-flight, queue and running gauges of ``/metrics`` are back to zero at the end;
- the server's resident memory after the run is at most 5% above what it was after a warm-up of
  the same mix (its allocator's pools grow for the first few thousand requests, ever more slowly).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import httpx

from benchmarks.common import machine_info, markdown_table, write_json
from benchmarks.servers import ServerProcess, free_port, taer_spec
from benchmarks.serving import resolve_inputs

logger = logging.getLogger(__name__)

ROUTES = {  # route -> (path, streamed)
    "chat": ("/v1/chat/completions", False),
    "chat-stream": ("/v1/chat/completions", True),
    "completions": ("/v1/completions", False),
    "completions-stream": ("/v1/completions", True),
    "generate": ("/generate", False),
    "generate_stream": ("/generate_stream", True),
}
GAUGES = ("taer_generation_requests_in_flight", "taer_queue_length", "taer_requests_running")
REQUESTS_COUNTER = "taer_http_requests_total"
MAX_RSS_GROWTH = 0.05


@dataclass(frozen=True, slots=True)
class SoakSettings:
    clients: int = 32
    requests: int = 2000
    max_tokens: int = 12
    cutting_clients: float = 0.1  # the share of clients that cut every stream after its first event
    deadline_share: float = 0.1  # the share of requests sent with a client deadline
    deadline_s: tuple[float, float] = (0.05, 1.5)  # drawn uniformly for each such request
    warmup_requests: int = 500  # the same mix, before the RSS baseline (the allocator's pools grow)
    seed: int = 0
    request_timeout_s: float = 300.0


@dataclass(frozen=True, slots=True)
class SoakRequest:
    """One request of the run: what to send, and how the client behaves."""

    index: int
    route: str
    prompt: str
    deadline_s: float | None = None

    @property
    def path(self) -> str:
        return ROUTES[self.route][0]

    @property
    def streamed(self) -> bool:
        return ROUTES[self.route][1]

    @property
    def family(self) -> str:
        """Requests of one family and prompt get the same answer, streamed or not."""
        return self.route.removesuffix("-stream").removesuffix("_stream")

    def body(self, max_tokens: int) -> dict:
        greedy = {"temperature": 0, "max_tokens": max_tokens, "ignore_eos": True, "stream": self.streamed}
        if self.family == "chat":
            return {"messages": [{"role": "user", "content": self.prompt}], **greedy}
        if self.family == "completions":
            return {"prompt": self.prompt, **greedy}
        parameters = {"max_new_tokens": max_tokens, "do_sample": False}
        return {"inputs": self.prompt, "parameters": parameters}


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one request ended: ``completed`` (with its text and response id), ``cut`` (the client
    closed it on purpose), ``deadline`` (the client gave up), or ``failed``."""

    request: SoakRequest
    kind: str
    text: str = ""
    response_id: str | None = None
    error: str | None = None


def plan(prompts: Sequence[str], settings: SoakSettings) -> list[SoakRequest]:
    """The run's requests, seeded: routes and prompts drawn uniformly, some with a deadline."""
    rng = random.Random(settings.seed)
    requests = []
    for index in range(settings.requests):
        deadline = rng.uniform(*settings.deadline_s) if rng.random() < settings.deadline_share else None
        requests.append(SoakRequest(index, rng.choice(list(ROUTES)), rng.choice(prompts), deadline))
    return requests


async def send(client: httpx.AsyncClient, request: SoakRequest, settings: SoakSettings, cut: bool) -> Outcome:
    """Send one request and read its answer (a cutting client stops after the first event)."""
    try:
        if request.deadline_s is None:
            return await _send(client, request, settings, cut)
        return await asyncio.wait_for(_send(client, request, settings, cut), request.deadline_s)
    except asyncio.TimeoutError:
        return Outcome(request, "deadline")
    except httpx.HTTPError as error:
        return Outcome(request, "failed", error=f"{type(error).__name__}: {error}")


async def _send(
    client: httpx.AsyncClient, request: SoakRequest, settings: SoakSettings, cut: bool
) -> Outcome:
    body = request.body(settings.max_tokens)
    if not request.streamed:
        response = await client.post(request.path, json=body)
        if response.status_code != 200:
            return Outcome(request, "failed", error=f"{response.status_code}: {response.text[:200]}")
        answer = response.json()
        return Outcome(request, "completed", answer_text(request.family, answer), answer.get("id"))
    async with client.stream("POST", request.path, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return Outcome(request, "failed", error=f"{response.status_code}: {response.text[:200]}")
        events = []
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line.removeprefix("data: "))
            if cut:  # leaving the block closes the connection mid-stream
                return Outcome(request, "cut")
    return stream_outcome(request, events)


def answer_text(family: str, answer: dict) -> str:
    if family == "chat":
        return answer["choices"][0]["message"]["content"]
    if family == "completions":
        return answer["choices"][0]["text"]
    return answer["generated_text"]


def stream_outcome(request: SoakRequest, events: Sequence[str]) -> Outcome:
    """A whole stream's outcome: completed only if it ended as its API says a stream ends."""
    if request.family == "generate":  # TGI: the last event carries generated_text; no [DONE]
        chunks = [json.loads(e) for e in events]
        finals = [c for c in chunks if c.get("generated_text") is not None]
        if len(finals) != 1 or finals[0] is not chunks[-1]:
            return Outcome(request, "failed", error=f"{len(finals)} final events: {events[-1:]}")
        return Outcome(request, "completed", finals[0]["generated_text"])
    if events.count("[DONE]") != 1 or events[-1] != "[DONE]":
        return Outcome(request, "failed", error=f"a stream not ended by one [DONE]: {events[-2:]}")
    chunks = [json.loads(e) for e in events[:-1]]
    if any("error" in c for c in chunks):
        return Outcome(request, "failed", error=str(next(c for c in chunks if "error" in c)))
    ids = {c["id"] for c in chunks}
    if len(ids) != 1:
        return Outcome(request, "failed", error=f"one stream, several ids: {sorted(ids)}")
    key = "content" if request.family == "chat" else "text"
    pieces = [(choice.get("delta", choice).get(key) or "") for c in chunks for choice in c.get("choices", ())]
    return Outcome(request, "completed", "".join(pieces), ids.pop())


async def run_requests(
    base_url: str, requests: Sequence[SoakRequest], settings: SoakSettings, clients: int
) -> list[Outcome]:
    """``clients`` closed-loop clients share ``requests``; the first tenth of them cut their streams."""
    cutting = round(clients * settings.cutting_clients)
    pending = iter(requests)
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    timeout = httpx.Timeout(settings.request_timeout_s)
    async with httpx.AsyncClient(
        base_url=base_url, limits=limits, timeout=timeout, trust_env=False
    ) as client:

        async def worker(number: int) -> None:
            for request in pending:
                cut = number < cutting and request.streamed
                outcomes.append(await send(client, request, settings, cut))

        await asyncio.gather(*(worker(number) for number in range(clients)))
    return outcomes


async def reference_answers(base_url: str, requests: Sequence[SoakRequest], settings: SoakSettings) -> dict:
    """(family, prompt) -> the text that request gets alone, non-streamed, one at a time."""
    keys = sorted({(r.family, r.prompt) for r in requests})
    references = {}
    async with httpx.AsyncClient(
        base_url=base_url, timeout=settings.request_timeout_s, trust_env=False
    ) as client:
        for family, prompt in keys:
            alone = SoakRequest(-1, family, prompt)
            outcome = await _send(client, alone, settings, cut=False)
            if outcome.kind != "completed":
                raise RuntimeError(f"the reference request {family} {prompt!r} failed: {outcome.error}")
            references[family, prompt] = outcome.text
    return references


def read_metrics(base_url: str) -> dict[str, float]:
    """The gauges, and the request counter per endpoint (``requests:ENDPOINT``), from ``/metrics``."""
    with httpx.Client(trust_env=False, timeout=30) as client:
        text = client.get(f"{base_url}/metrics").text
    values: Counter = Counter()
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, value = line.rsplit(" ", 1)
        if name in GAUGES:
            values[name] = float(value)
        elif name.startswith(REQUESTS_COUNTER + "{"):
            endpoint = name.split('endpoint="', 1)[1].split('"', 1)[0]
            values[f"requests:{endpoint}"] += float(value)
    return dict(values)


def settled_metrics(base_url: str, deadline_s: float = 120.0) -> dict[str, float]:
    """The metrics once every gauge is back to zero, or the last read at the deadline (a stream cut
    by its client is noticed by the server at its next token, so this takes a moment)."""
    deadline = time.monotonic() + deadline_s
    while True:
        metrics = read_metrics(base_url)
        if all(metrics.get(g, 0.0) == 0.0 for g in GAUGES) or time.monotonic() > deadline:
            return metrics
        time.sleep(0.5)


def check(
    outcomes: Sequence[Outcome], references: dict, sent: Counter, counted: Counter, rss: dict, gauges: dict
) -> dict:
    """The soak's figures and whether each rule held."""
    kinds = Counter(o.kind for o in outcomes)
    completed = [o for o in outcomes if o.kind == "completed"]
    mismatches = [o for o in completed if o.text != references[o.request.family, o.request.prompt]]
    ids = Counter(o.response_id for o in completed if o.response_id is not None)
    duplicated_ids = sum(n - 1 for n in ids.values() if n > 1)
    ended = len({o.request.index for o in outcomes})
    abandoned = Counter(o.request.path for o in outcomes if o.kind == "deadline")
    lost = sum(sent.values()) - ended + sum(max(0, sent[p] - abandoned[p] - counted[p]) for p in sent)
    duplicated = duplicated_ids + (len(outcomes) - ended) + sum(max(0, counted[p] - sent[p]) for p in sent)
    growth = rss["after_run"] / rss["after_warmup"] - 1
    anon_growth = (
        rss["anon_after_run"] / rss["anon_after_warmup"] - 1 if rss.get("anon_after_warmup") else None
    )
    return {
        "sent": sum(sent.values()),
        "outcomes": dict(kinds),
        "mismatches": len(mismatches),
        "mismatch_examples": [
            {"route": o.request.route, "prompt": o.request.prompt, "text": o.text} for o in mismatches[:5]
        ],
        "failed_examples": sorted({o.error for o in outcomes if o.kind == "failed"})[:5],
        "lost": lost,
        "duplicated": duplicated,
        "sent_per_path": dict(sent),
        "server_counted_per_path": {p: counted[p] for p in sent},
        "gauges_at_end": {g: gauges.get(g, 0.0) for g in GAUGES},
        "rss_bytes": rss,
        "rss_growth": growth,
        "rss_anon_growth": anon_growth,
        "ok": not mismatches
        and not lost
        and not duplicated
        and kinds["failed"] == 0
        and all(gauges.get(g, 0.0) == 0.0 for g in GAUGES)
        and growth <= MAX_RSS_GROWTH,
    }


def soak(server: ServerProcess, prompts: Sequence[str], settings: SoakSettings) -> dict:
    """The whole soak against a started server: references, warm-up, the run, the checks."""
    base_url = server.spec.base_url
    requests = plan(prompts, settings)
    references = asyncio.run(reference_answers(base_url, requests, settings))
    warmup_plan = plan(prompts, replace(settings, requests=settings.warmup_requests, seed=settings.seed + 1))
    warmup = [replace(r, index=-1 - r.index) for r in warmup_plan]
    asyncio.run(run_requests(base_url, warmup, settings, settings.clients))
    settled_metrics(base_url)
    before, warm = read_metrics(base_url), server.memory()
    start = time.perf_counter()
    outcomes = asyncio.run(run_requests(base_url, requests, settings, settings.clients))
    wall_s = time.perf_counter() - start
    after = settled_metrics(base_url)
    memory = server.memory()
    sent = Counter(r.path for r in requests)
    counted = Counter(
        {p: round(after.get(f"requests:{p}", 0) - before.get(f"requests:{p}", 0)) for p in sent}
    )
    rss = {
        "after_warmup": warm["rss_bytes"],
        "after_run": memory["rss_bytes"],
        "peak": memory["peak_rss_bytes"],
        "anon_after_warmup": warm["rss_anon_bytes"],
        "anon_after_run": memory["rss_anon_bytes"],
        "file_after_warmup": warm["rss_file_bytes"],
        "file_after_run": memory["rss_file_bytes"],
    }
    figures = check(outcomes, references, sent, counted, rss, after)
    settings_json = asdict(settings) | {"prompts": len(prompts), "references": len(references)}
    return {"settings": settings_json, "wall_s": wall_s, **figures}


def task_prompts(tasks_file: Path, per_task: int) -> list[str]:
    """The first ``per_task`` calibration queries of every task in a TASKS.yaml."""
    from retrieval.tasks_file import load_tasks_file

    return [p.query_text for task in load_tasks_file(tasks_file) for p in task.calibration[:per_task]]


def _file_pages(rss: dict) -> str:
    """The file-backed resident MiB after the warm-up -> after the run (the store's mapped shards)."""
    if "file_after_warmup" not in rss:
        return "-"
    return f"{rss['file_after_warmup'] / 2**20:.0f} -> {rss['file_after_run'] / 2**20:.0f}"


def render(report: dict) -> str:
    s, outcomes = report["settings"], report["outcomes"]
    rows = [
        [
            s["clients"],
            report["sent"],
            outcomes.get("completed", 0),
            outcomes.get("cut", 0),
            outcomes.get("deadline", 0),
            outcomes.get("failed", 0),
            report["lost"],
            report["duplicated"],
            report["mismatches"],
            "0" if not any(report["gauges_at_end"].values()) else report["gauges_at_end"],
            f"{report['rss_growth']:+.1%}",
            "-" if report.get("rss_anon_growth") is None else f"{report['rss_anon_growth']:+.1%}",
            _file_pages(report["rss_bytes"]),
            report["wall_s"],
        ]
    ]
    headers = [
        "clients",
        "requests",
        "completed",
        "cut mid-stream",
        "past deadline",
        "failed",
        "lost",
        "duplicated",
        "differ from alone",
        "gauges at end",
        "RSS after warm-up -> end",
        "of it anonymous",
        "file pages MiB",
        "wall s",
    ]
    intro = (
        f"{s['requests']} greedy requests of {s['max_tokens']} tokens over {len(ROUTES)} route forms, "
        f"{s['prompts']} prompts drawn from every task, {s['clients']} closed-loop clients ({s['cutting_clients']:.0%} "
        f"of them cut every stream after its first event), {s['deadline_share']:.0%} of requests with a "
        f"client deadline of {s['deadline_s'][0]:g}-{s['deadline_s'][1]:g} s, seed {s['seed']}.\n"
    )
    return intro + markdown_table(headers, rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", type=Path, default=Path(".taer"), help="demo data directory (default .taer)"
    )
    parser.add_argument("--store", type=Path, help="a store (instead of the demo's)")
    parser.add_argument("--patterns", type=Path, help="its patterns directory")
    parser.add_argument("--tasks", type=Path, help="the TASKS.yaml whose calibration prompts are sent")
    parser.add_argument("--slots-per-layer", type=int, help="passed to the started taer serve")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="writes soak.json here")
    parser.add_argument("--clients", type=int, default=SoakSettings().clients)
    parser.add_argument("--requests", type=int, default=SoakSettings().requests)
    parser.add_argument("--max-tokens", type=int, default=SoakSettings().max_tokens)
    parser.add_argument(
        "--warmup",
        type=int,
        default=SoakSettings().warmup_requests,
        help="requests of the same mix sent before the RSS baseline is read",
    )
    parser.add_argument("--per-task", type=int, default=6, help="prompts per task")
    parser.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    inputs = resolve_inputs(args.data, args.store, args.patterns, None, args.tasks)
    store, patterns, tasks = inputs.store, inputs.patterns, inputs.tasks
    settings = SoakSettings(
        clients=args.clients,
        requests=args.requests,
        max_tokens=args.max_tokens,
        warmup_requests=args.warmup,
        seed=args.seed,
    )
    spec = taer_spec(store, patterns, 0.5, free_port(), name="soak")
    if args.slots_per_layer:
        spec = replace(spec, command=[*spec.command, "--slots-per-layer", str(args.slots_per_layer)])
    with contextlib.suppress(FileExistsError):
        args.out.mkdir(parents=True)
    with ServerProcess(spec, args.out / "soak-logs" / "taer.log") as server:
        report = soak(server, task_prompts(tasks, args.per_task), settings)
    report["machine"] = machine_info()
    write_json(args.out / "soak.json", report)
    print("## Soak\n\n" + render(report))
    for example in report["mismatch_examples"] + report["failed_examples"]:
        print(f"  {example}")
    return 0 if report["ok"] else 1
