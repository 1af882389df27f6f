"""Part 2 of `taer bench api`: one request with ``n`` samples against ``n`` concurrent requests of
one sample each, the same prompt and seeds, over HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from benchmarks.api_timing import Streamed, first_arm, paired_ratios, spread, stream_chat

ARMS = ("one", "separate")  # one request with n samples; n requests of one


@dataclass(frozen=True, slots=True)
class SamplesSettings:
    samples: int = 4  # n, and the number of separate requests
    rounds: int = 16
    max_tokens: int = 32  # every sample generates exactly this many (ignore_eos)
    temperature: float = 0.8
    seed: int = 0


@dataclass(frozen=True, slots=True)
class ArmRun:
    """One arm of a round: its streams, sent together, and the wall time until all had ended."""

    streams: tuple[Streamed, ...]
    wall_s: float

    @property
    def tokens(self) -> int:
        return sum(s.completion_tokens for s in self.streams)

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens prefilled: once per request, however many samples it asks for."""
        return sum(s.prompt_tokens for s in self.streams)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def every_first_token_s(self) -> float:
        """Until every sample had its first token (the concurrent requests leave together)."""
        return max(s.every_first_token_s for s in self.streams)

    @property
    def texts(self) -> tuple[str, ...]:
        return tuple(text for s in self.streams for text in s.texts)


def bodies(prompt: str, seed: int, settings: SamplesSettings) -> dict[str, list[dict]]:
    """Each arm's request bodies: sample ``i`` of the one request is seeded ``seed + i``, as the
    ``i``-th separate request is, so both arms should draw the same samples."""
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": settings.max_tokens,
        "temperature": settings.temperature,
        "ignore_eos": True,
    }
    return {
        "one": [{**body, "n": settings.samples, "seed": seed}],
        "separate": [{**body, "seed": seed + index} for index in range(settings.samples)],
    }


async def run_arm(client: httpx.AsyncClient, arm_bodies: Sequence[dict]) -> ArmRun:
    """Send ``arm_bodies`` concurrently and wait for all of them."""
    start = time.perf_counter()
    streams = await asyncio.gather(*(stream_chat(client, body) for body in arm_bodies))
    return ArmRun(tuple(streams), time.perf_counter() - start)


async def measure_samples(
    client: httpx.AsyncClient, prompts: Sequence[str], settings: SamplesSettings
) -> dict:
    """Per round (the prompts in turn), both arms back to back in alternating order."""
    for arm_bodies in bodies(prompts[0], settings.seed, settings).values():  # warm-up
        await run_arm(client, arm_bodies)
    rounds = []
    for round_ in range(settings.rounds):
        seed = settings.seed + round_ * settings.samples
        pair = bodies(prompts[round_ % len(prompts)], seed, settings)
        order = ARMS if first_arm(round_, 0) == 0 else tuple(reversed(ARMS))
        rounds.append({arm: await run_arm(client, pair[arm]) for arm in order})
    return samples_summary(rounds)


def samples_summary(rounds: Sequence[dict[str, ArmRun]]) -> dict:
    """The figures of rounds of ``{"one": ArmRun, "separate": ArmRun}``; ratios are one / separate."""

    def arm_figure(arm: str, figure: str) -> list[float]:
        return [getattr(r[arm], figure) for r in rounds]

    def ratio(figure: str) -> dict:
        return spread(paired_ratios(arm_figure("one", figure), arm_figure("separate", figure)))

    figures = ("wall_s", "tokens_per_s", "every_first_token_s", "tokens", "prompt_tokens")
    same = [a == b for r in rounds for a, b in zip(r["one"].texts, r["separate"].texts, strict=True)]
    return {
        "rounds": len(rounds),
        "samples": len(rounds[0]["one"].texts) if rounds else 0,
        "arms": {arm: {f: spread(arm_figure(arm, f)) for f in figures} for arm in ARMS},
        "tokens_per_s_ratio": ratio("tokens_per_s"),
        "wall_ratio": ratio("wall_s"),
        "every_first_token_ratio": ratio("every_first_token_s"),
        "samples_equal_to_separate": sum(same),
        "samples_compared": len(same),
    }
