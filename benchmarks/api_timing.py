"""Timing streamed chat completions on the client, and summing up paired measurements.

A ``Streamed`` is one streamed ``/v1/chat/completions`` request as the client saw it: when each
event that carried a sample's token arrived (the one with its last token also carries the finish
reason), the texts and the server's usage. Ratios are taken pair by pair (two arms measured back to
back, so background load on a shared CPU falls on both alike) and summed up as a median with its
spread.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from benchmarks.common import percentile

CHAT_PATH = "/v1/chat/completions"


@dataclass(frozen=True, slots=True)
class Streamed:
    """One streamed chat completion, every time in seconds since the client sent it."""

    token_event_s: tuple[tuple[float, ...], ...]  # per sample: its events that carried tokens
    texts: tuple[str, ...]
    finish_reasons: tuple[str | None, ...]
    prompt_tokens: int
    completion_tokens: int

    @property
    def first_token_s(self) -> float:
        """When the first sample's first token arrived."""
        return self.token_event_s[0][0]

    @property
    def every_first_token_s(self) -> float:
        """When the last of the samples got its first token."""
        return max(events[0] for events in self.token_event_s)

    @property
    def per_token_s(self) -> float | None:
        """Decode time per token of a one-sample stream: its first to last token (the last event
        carries the finish reason) over the gaps between them; None with fewer than two tokens."""
        if len(self.texts) != 1 or self.completion_tokens < 2:
            return None
        events = self.token_event_s[0]
        return (events[-1] - events[0]) / (self.completion_tokens - 1)

    @property
    def median_gap_s(self) -> float | None:
        """The median gap between a one-sample stream's token events: a decode step, less exposed
        than ``per_token_s`` to a step stretched by other work on the machine (None if no gap)."""
        if len(self.texts) != 1 or len(self.token_event_s[0]) < 2:
            return None
        events = self.token_event_s[0]
        return statistics.median(b - a for a, b in itertools.pairwise(events))


async def stream_chat(client: httpx.AsyncClient, body: dict) -> Streamed:
    """Send ``body`` streamed (with usage) and time it; an HTTP error or an error event raises."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    samples = body.get("n") or 1
    events: dict[int, list[float]] = {index: [] for index in range(samples)}
    texts: dict[int, list[str]] = {index: [] for index in range(samples)}
    reasons: dict[int, str | None] = dict.fromkeys(range(samples))
    usage: dict = {}
    start = time.perf_counter()
    async with client.stream("POST", CHAT_PATH, json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            raise RuntimeError(f"HTTP {response.status_code} for {json.dumps(body)[:300]}: {text[:300]}")
        async for line in response.aiter_lines():
            payload = line.removeprefix("data: ")
            if payload == line or payload == "[DONE]":
                continue
            now = time.perf_counter() - start
            event = json.loads(payload)
            if "error" in event:
                raise RuntimeError(f"an error event for {json.dumps(body)[:300]}: {payload[:300]}")
            usage = event.get("usage") or usage
            for choice in event.get("choices") or ():
                index, content = choice["index"], (choice.get("delta") or {}).get("content") or ""
                if content or choice.get("finish_reason"):
                    events[index].append(now)
                texts[index].append(content)
                reasons[index] = choice.get("finish_reason") or reasons[index]
    if not all(events.values()) or not usage:
        raise RuntimeError(f"a stream without every sample's tokens or usage: {json.dumps(body)[:300]}")
    return Streamed(
        token_event_s=tuple(tuple(events[i]) for i in range(samples)),
        texts=tuple("".join(texts[i]) for i in range(samples)),
        finish_reasons=tuple(reasons[i] for i in range(samples)),
        prompt_tokens=usage["prompt_tokens"],
        completion_tokens=usage["completion_tokens"],
    )


def matched_per_token(a: Streamed, b: Streamed) -> tuple[float | None, float | None]:
    """Two one-sample streams' time per token over the same number of token events from their
    first, as many as the shorter has: the same positions in the output, and the same exposure to
    other work on the machine (a long stream is likelier to meet a burst of it than a short one)."""
    count = min(len(a.token_event_s[0]), len(b.token_event_s[0]))
    if len(a.texts) != 1 or len(b.texts) != 1 or count < 2:
        return None, None
    first, second = ((s.token_event_s[0][count - 1] - s.token_event_s[0][0]) / (count - 1) for s in (a, b))
    return first, second


def paired_ratios(numerators: Sequence[float | None], denominators: Sequence[float | None]) -> list[float]:
    """``a / b`` for every pair measured back to back; a pair missing either side is left out."""
    if len(numerators) != len(denominators):
        raise ValueError(f"{len(numerators)} numerators but {len(denominators)} denominators")
    return [a / b for a, b in zip(numerators, denominators, strict=True) if a is not None and b and b > 0]


def spread(values: Sequence[float | None]) -> dict:
    """Median, quartiles, extremes and count of the values that were measured (None left out)."""
    measured = [v for v in values if v is not None]
    if not measured:
        return {"median": None, "p25": None, "p75": None, "min": None, "max": None, "count": 0}
    return {
        "median": statistics.median(measured),
        "p25": percentile(measured, 25),
        "p75": percentile(measured, 75),
        "min": min(measured),
        "max": max(measured),
        "count": len(measured),
    }


def describe(summary: dict, scale: float = 1.0, unit: str = "") -> str:
    """``median (p25-p75)`` of a ``spread``, times ``scale``."""
    if summary["median"] is None:
        return "not measured"
    median, low, high = (summary[k] * scale for k in ("median", "p25", "p75"))
    return f"{median:.3g}{unit} ({low:.3g}-{high:.3g})"


def first_arm(round_: int, index: int) -> int:
    """Which of two arms goes first for request ``index`` of round ``round_``: they alternate within
    a round and from one round to the next, so neither always follows the other."""
    return (round_ + index) % 2
