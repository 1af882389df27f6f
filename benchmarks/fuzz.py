"""`taer bench fuzz`: schema-driven fuzzing of a real `taer serve` from its own ``/openapi.json``.

Schemathesis turns every route of the published schema into Hypothesis strategies, both *positive*
(requests the schema allows: they must be served, or refused with a 400 where a rule no JSON schema
can state applies, such as the prompt's tokens plus ``max_tokens`` fitting the context) and
*negative* (requests the schema forbids: they must be refused with a 4xx). The cases are drawn first
(seeded, so a run is repeatable) and then sent by a few concurrent clients, so the engine batches
them as it would real traffic. Every response is checked: no 5xx, every 4xx in the OpenAI error
shape ``{"error": {"message", "type", "param", "code"}}``, and no server error inside a stream.
Before and after the run the server must be healthy and answer one greedy request the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import httpx

from benchmarks.common import machine_info, markdown_table, write_json
from benchmarks.servers import ServerProcess, free_port, taer_spec

logger = logging.getLogger(__name__)

ERROR_FIELDS = ("message", "type", "param", "code")
# Cases drawn per Hypothesis run: a long run draws ever more slowly, so more runs of other seeds.
DRAW_CHUNK = 250
GREEDY_PROBE = {"prompt": "Reverse the letters of the word stone.", "max_tokens": 12, "temperature": 0}


@dataclass(frozen=True, slots=True)
class FuzzSettings:
    cases: int = 10_000
    seed: int = 0
    clients: int = 8  # concurrent senders; the engine batches their requests
    request_timeout_s: float = 300.0


@dataclass(frozen=True, slots=True)
class Finding:
    """One response that broke a rule, with a command that replays the request."""

    route: str
    status: int
    problem: str
    curl: str


@dataclass(slots=True)
class FuzzResult:
    statuses: dict[str, Counter] = field(default_factory=dict)  # route -> status -> count
    findings: list[Finding] = field(default_factory=list)
    generate_s: float = 0.0
    send_s: float = 0.0

    @property
    def cases(self) -> int:
        return sum(sum(counts.values()) for counts in self.statuses.values())

    @property
    def server_errors(self) -> int:
        return sum(n for counts in self.statuses.values() for status, n in counts.items() if status >= 500)

    def summary(self) -> dict:
        return {
            "cases": self.cases,
            "routes": sorted(self.statuses),
            "server_errors": self.server_errors,
            "findings": len(self.findings),
            "generate_s": self.generate_s,
            "send_s": self.send_s,
            "statuses": {route: dict(sorted(c.items())) for route, c in sorted(self.statuses.items())},
            "examples": [asdict(f) for f in _distinct(self.findings)[:20]],
        }


def response_problem(status: int, content_type: str, text: str) -> str | None:
    """What is wrong with one response, or None: a 5xx, a 4xx not in the OpenAI error shape, or a
    server error sent as an event inside a stream."""
    if status >= 500:
        return f"server error {status}: {text[:200]}"
    if status >= 400:
        return _error_shape_problem(text)
    if content_type.startswith("text/event-stream"):
        for line in text.splitlines():
            payload = line.removeprefix("data: ")
            if payload == line or payload == "[DONE]":
                continue
            with contextlib.suppress(ValueError):
                event = json.loads(payload)
                if isinstance(event, dict) and _is_server_error(event.get("error")):
                    return f"server error inside the stream: {payload[:200]}"
    return None


def _error_shape_problem(text: str) -> str | None:
    try:
        body = json.loads(text)
    except ValueError:
        return f"a 4xx body that is not JSON: {text[:200]!r}"
    error = body.get("error") if isinstance(body, dict) else None
    if (
        set(body) != {"error"}
        or not isinstance(error, dict)
        or tuple(sorted(error)) != tuple(sorted(ERROR_FIELDS))
    ):
        return f"a 4xx not in the OpenAI error shape: {text[:200]}"
    if not (isinstance(error["message"], str) and isinstance(error["type"], str)):
        return f"a 4xx whose message or type is not a string: {text[:200]}"
    if not all(error[key] is None or isinstance(error[key], str) for key in ("param", "code")):
        return f"a 4xx whose param or code is neither a string nor null: {text[:200]}"
    return None


def _is_server_error(error: object) -> bool:
    return isinstance(error, dict) and error.get("type") == "server_error"


def draw_cases(schema, total: int, seed: int) -> list:
    """About ``total`` schemathesis cases over every operation, positive and negative alike.
    A pair whose strategy runs out (a GET without parameters has one case, and nothing to negate)
    gives what it has; the others make up the rest."""
    from schemathesis import GenerationMode

    pairs = [(result.ok(), mode) for result in schema.get_all_operations() for mode in GenerationMode]
    cases: list = []
    open_pairs, round_ = pairs, 0
    while len(cases) < total and open_pairs:
        quota = min(DRAW_CHUNK, math.ceil((total - len(cases)) / len(open_pairs)))
        still_open = []
        for operation, mode in open_pairs:
            drawn = _draw(operation.as_strategy(generation_mode=mode), quota, seed + round_)
            cases += drawn
            if len(drawn) >= quota:
                still_open.append((operation, mode))
        open_pairs, round_ = still_open, round_ + 1
    return cases[:total] if len(cases) > total else cases


def _draw(strategy, count: int, seed: int) -> list:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis.errors import Unsatisfiable

    drawn: list = []

    @hypothesis_seed(seed)
    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(case) -> None:
        drawn.append(case)

    with contextlib.suppress(Unsatisfiable):  # nothing to draw, e.g. a negative case of a bare GET
        collect()
    return drawn


def send_cases(cases: Sequence, base_url: str, settings: FuzzSettings) -> FuzzResult:
    """Every case sent by ``settings.clients`` concurrent clients, every response checked."""
    import requests

    local = threading.local()
    result = FuzzResult()
    lock = threading.Lock()

    def send(case) -> None:
        if not hasattr(local, "session"):
            local.session = requests.Session()
            local.session.trust_env = False  # never a proxy for loopback traffic
        route = f"{case.method.upper()} {case.path}"
        try:
            response = case.call(base_url=base_url, session=local.session, timeout=settings.request_timeout_s)
            content_type = (response.headers.get("content-type") or [""])[0]  # schemathesis: lists
            status = response.status_code
            problem = response_problem(status, content_type, response.text)
        except requests.RequestException as error:
            status, problem = 599, f"no response: {type(error).__name__}: {error}"
        with lock:
            result.statuses.setdefault(route, Counter())[status] += 1
            if problem:
                result.findings.append(
                    Finding(route, status, problem, case.as_curl_command(base_url=base_url))
                )

    start = time.perf_counter()
    with ThreadPoolExecutor(settings.clients) as pool:
        list(pool.map(send, cases))
    result.send_s = time.perf_counter() - start
    return result


def fuzz(base_url: str, settings: FuzzSettings) -> FuzzResult:
    """Draw ``settings.cases`` cases from the server's schema and send them."""
    import schemathesis

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    start = time.perf_counter()
    cases = draw_cases(schema, settings.cases, settings.seed)
    generate_s = time.perf_counter() - start
    logger.info("drew %d cases in %.1f s; sending", len(cases), generate_s)
    result = send_cases(cases, base_url, settings)
    result.generate_s = generate_s
    return result


def health_and_greedy_answer(base_url: str) -> tuple[int, str]:
    """``/health``'s status and the text of one greedy completion: the same before and after a run."""
    with httpx.Client(base_url=base_url, trust_env=False, timeout=120) as client:
        health = client.get("/health").status_code
        answer = client.post("/v1/completions", json=GREEDY_PROBE)
        answer.raise_for_status()
        return health, answer.json()["choices"][0]["text"]


def _distinct(findings: Sequence[Finding]) -> list[Finding]:
    """One finding per (route, status, first words of the problem)."""
    seen, kept = set(), []
    for finding in findings:
        key = (finding.route, finding.status, finding.problem[:60])
        if key not in seen:
            seen.add(key)
            kept.append(finding)
    return kept


def render(result: FuzzResult) -> str:
    rows = []
    for route, counts in sorted(result.statuses.items()):
        by_class = Counter(f"{status // 100}xx" for status in counts.elements())
        found = sum(1 for f in result.findings if f.route == route)
        rows.append([route, sum(counts.values()), by_class["2xx"], by_class["4xx"], by_class["5xx"], found])
    rows.append(
        [
            "all",
            result.cases,
            sum(r[2] for r in rows),
            sum(r[3] for r in rows),
            result.server_errors,
            len(result.findings),
        ]
    )
    table = markdown_table(["route", "cases", "2xx", "4xx", "5xx", "rule broken"], rows)
    return f"{table}\n\ndrawn in {result.generate_s:.1f} s, sent in {result.send_s:.1f} s"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", type=Path, default=Path(".taer"), help="demo data directory (default .taer)"
    )
    parser.add_argument("--store", type=Path, help="a store (instead of the demo's)")
    parser.add_argument("--patterns", type=Path, help="its patterns directory")
    parser.add_argument(
        "--url", help="fuzz this running server (http://127.0.0.1:PORT) instead of starting one"
    )
    parser.add_argument("--slots-per-layer", type=int, help="passed to the started taer serve")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="writes fuzz.json here")
    parser.add_argument("--cases", type=int, default=FuzzSettings().cases)
    parser.add_argument("--clients", type=int, default=FuzzSettings().clients)
    parser.add_argument("--seed", type=int, default=0)


def run_against(base_url: str, settings: FuzzSettings) -> dict:
    """The whole check against one server: healthy and greedy before, the fuzz, healthy and greedy
    after. Returns the report's JSON."""
    before = health_and_greedy_answer(base_url)
    result = fuzz(base_url, settings)
    after = health_and_greedy_answer(base_url)
    return {
        "settings": {"cases": settings.cases, "seed": settings.seed, "clients": settings.clients},
        "result": result.summary(),
        "healthy_after": after[0] == 200,
        "greedy_answer_unchanged": before == after,
        "table": render(result),
    }


def main(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = FuzzSettings(cases=args.cases, seed=args.seed, clients=args.clients)
    if args.url:
        report = run_against(args.url.rstrip("/"), settings)
    else:
        store, patterns = args.store, args.patterns
        if store is None or patterns is None:
            from demo.prepare import DemoPaths, prepare_demo

            prepared = prepare_demo(DemoPaths.under(args.data))
            store, patterns = prepared.store, prepared.patterns
        spec = taer_spec(store, patterns, 0.5, free_port(), name="fuzz")
        if args.slots_per_layer:
            spec = replace(spec, command=[*spec.command, "--slots-per-layer", str(args.slots_per_layer)])
        with ServerProcess(spec, args.out / "fuzz-logs" / "taer.log") as server:
            report = run_against(server.spec.base_url, settings)
    report["machine"] = machine_info()
    write_json(args.out / "fuzz.json", report)
    summary = report["result"]
    print(f"## Schema-driven fuzzing ({summary['cases']} cases, seed {settings.seed})\n\n{report['table']}")
    print(
        f"\nhealthy after: {report['healthy_after']}; "
        f"greedy answer unchanged: {report['greedy_answer_unchanged']}"
    )
    for finding in summary["examples"]:
        print(f"\n{finding['route']} -> {finding['status']}: {finding['problem']}\n  {finding['curl'][:600]}")
    clean = not summary["findings"] and report["healthy_after"] and report["greedy_answer_unchanged"]
    return 0 if clean else 1
