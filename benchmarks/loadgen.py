"""A small, bounded load generator for OpenAI-style streaming endpoints, on the loopback only.

``clients`` workers share a fixed list of request bodies; each sends one streaming request at a time
and records its time to the first content chunk and its end-to-end latency. The run stops after
``requests`` requests or ``time_cap_s`` seconds, whichever comes first: requests still in flight at
the cap are cancelled and counted as cut.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

from benchmarks.common import percentile

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class Workload:
    """What to send: bodies (cycled), the endpoint path, concurrency and bounds."""

    bodies: Sequence[dict]
    path: str
    clients: int
    requests: int
    time_cap_s: float = 120.0
    request_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if not self.bodies or self.clients < 1 or self.requests < 1 or self.time_cap_s <= 0:
            raise ValueError("a workload needs bodies, clients >= 1, requests >= 1 and a positive time cap")


@dataclass(frozen=True, slots=True)
class RequestRecord:
    ok: bool
    ttft_s: float | None
    latency_s: float
    completion_tokens: int
    error: str | None = None


@dataclass(slots=True)
class LoadResult:
    clients: int
    sent: int
    completed: int
    failed: int
    cut: int
    wall_s: float
    completion_tokens: int
    records: list[RequestRecord] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        """Completed requests' generated tokens per second of wall time."""
        return self.completion_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self) -> dict:
        ok = [r for r in self.records if r.ok]
        ttft = [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None]
        latency = [r.latency_s * 1e3 for r in ok]
        errors = sorted({r.error for r in self.records if r.error})
        return {
            "clients": self.clients,
            "sent": self.sent,
            "completed": self.completed,
            "failed": self.failed,
            "cut": self.cut,
            "wall_s": self.wall_s,
            "completion_tokens": self.completion_tokens,
            "throughput_tokens_per_s": self.throughput,
            "ttft_ms_p50": percentile(ttft, 50),
            "ttft_ms_p99": percentile(ttft, 99),
            "latency_ms_p50": percentile(latency, 50),
            "latency_ms_p99": percentile(latency, 99),
            "errors": errors[:5],
        }


def check_loopback(base_url: str) -> None:
    """Load goes to 127.0.0.1 only; anything else is a mistake in the caller."""
    host = urlsplit(base_url).hostname
    if host != LOOPBACK:
        raise ValueError(f"the load generator only targets {LOOPBACK}, not {host!r} ({base_url})")


async def run_load(base_url: str, workload: Workload) -> LoadResult:
    """Run ``workload`` against ``base_url`` (http://127.0.0.1:PORT)."""
    check_loopback(base_url)
    url = base_url.rstrip("/") + workload.path
    next_index = iter(range(workload.requests))
    records: list[RequestRecord] = []
    limits = httpx.Limits(max_connections=workload.clients, max_keepalive_connections=workload.clients)
    timeout = httpx.Timeout(workload.request_timeout_s)
    # trust_env=False: a proxy from the environment must never see loopback benchmark traffic.
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:

        async def worker() -> None:
            for index in next_index:
                body = workload.bodies[index % len(workload.bodies)]
                records.append(await stream_one(client, url, body))

        start = time.perf_counter()
        tasks = [asyncio.create_task(worker()) for _ in range(workload.clients)]
        _, pending = await asyncio.wait(tasks, timeout=workload.time_cap_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - start
    completed = [r for r in records if r.ok]
    return LoadResult(
        clients=workload.clients,
        sent=len(records) + len(pending),
        completed=len(completed),
        failed=len(records) - len(completed),
        cut=len(pending),
        wall_s=wall,
        completion_tokens=sum(r.completion_tokens for r in completed),
        records=records,
    )


async def stream_one(client: httpx.AsyncClient, url: str, body: dict) -> RequestRecord:
    """One streaming request: TTFT at the first non-empty content, tokens from ``usage`` when sent."""
    start = time.perf_counter()
    ttft, chunks, usage_tokens = None, 0, None
    try:
        async with client.stream("POST", url, json={**body, "stream": True}) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")[:200]
                return RequestRecord(
                    False, None, time.perf_counter() - start, 0, f"HTTP {response.status_code}: {text}"
                )
            async for line in response.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                event = json.loads(line[5:])
                if event.get("usage"):
                    usage_tokens = event["usage"].get("completion_tokens")
                if _content(event):
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - start
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        return RequestRecord(False, ttft, time.perf_counter() - start, 0, f"{type(error).__name__}: {error}")
    tokens = usage_tokens if usage_tokens is not None else chunks
    return RequestRecord(True, ttft, time.perf_counter() - start, tokens)


def _content(event: dict) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    return (choice.get("delta") or {}).get("content") or choice.get("text") or ""
