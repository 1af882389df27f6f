"""Part 1 of `taer bench api`: constrained decoding (``response_format`` json_schema) against free
decoding of the same prompts, over HTTP, and the grammar's own work per token in this process."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.api_timing import (
    Streamed,
    first_arm,
    matched_per_token,
    paired_ratios,
    spread,
    stream_chat,
)

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "integer"}},
    "required": ["answer"],
    "additionalProperties": False,
}
VALID_ANSWER = '{"answer":42}'  # what the grammar timing replays (compact, as the server writes JSON)
MAX_RATIO = 1.10  # the target: constrained decode per token at most 1.10x free decode
WARMUP_PROMPTS = 2


@dataclass(frozen=True, slots=True)
class ConstrainedSettings:
    rounds: int = 16  # every prompt once in each arm per round
    max_tokens: int = 32
    temperature: float = 0.0
    seed: int = 0
    mask_repeats: int = 200  # replays of VALID_ANSWER, each through a fresh matcher


def bodies(prompt: str, settings: ConstrainedSettings) -> dict[str, dict]:
    """The two arms' request bodies for one prompt, the same but for ``response_format``."""
    free = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": settings.max_tokens,
        "temperature": settings.temperature,
        "seed": settings.seed,
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    return {"constrained": {**free, "response_format": response_format}, "free": free}


async def measure_constrained(
    client: httpx.AsyncClient, prompts: Sequence[str], settings: ConstrainedSettings
) -> dict:
    """Every prompt in both arms, back to back in alternating order, for ``settings.rounds`` rounds."""
    for prompt in prompts[:WARMUP_PROMPTS]:  # compiles the schema, warms the server's paths
        for body in bodies(prompt, settings).values():
            await stream_chat(client, body)
    arms: dict[str, list[Streamed]] = {"constrained": [], "free": []}
    for round_ in range(settings.rounds):
        for index, prompt in enumerate(prompts):
            pair = bodies(prompt, settings)
            order = list(arms) if first_arm(round_, index) == 0 else list(reversed(arms))
            for arm in order:
                arms[arm].append(await stream_chat(client, pair[arm]))
    return constrained_summary(arms["constrained"], arms["free"])


def constrained_summary(constrained: Sequence[Streamed], free: Sequence[Streamed]) -> dict:
    """The figures of the pairs ``constrained[i]``, ``free[i]`` (each measured back to back)."""
    verdicts = [json_verdict(s.texts[0], SCHEMA) for s in constrained]
    # The target's ratio compares the same positions: here the first steps after the prefill are
    # slower than later ones, and the constrained answers are the longer.
    matched = [matched_per_token(c, f) for c, f in zip(constrained, free, strict=True)]
    ratios = paired_ratios([c for c, _ in matched], [f for _, f in matched])
    whole = paired_ratios([s.per_token_s for s in constrained], [s.per_token_s for s in free])
    gaps = paired_ratios([s.median_gap_s for s in constrained], [s.median_gap_s for s in free])
    return {
        "pairs": len(constrained),
        "ratio": spread(ratios),
        "whole_answer_ratio": spread(whole),
        "median_gap_ratio": spread(gaps),
        "arms": {"constrained": _arm_summary(constrained), "free": _arm_summary(free)},
        "parsed": sum(parsed for parsed, _ in verdicts),
        "valid": sum(valid for _, valid in verdicts),
        "examples": {
            "constrained": sorted({s.texts[0] for s in constrained})[:5],
            "free": sorted({s.texts[0] for s in free})[:5],
        },
    }


def json_verdict(text: str, schema: dict) -> tuple[bool, bool]:
    """(``text`` parses as JSON, and it validates against ``schema``)."""
    import jsonschema

    try:
        value = json.loads(text)
    except ValueError:
        return False, False
    return True, jsonschema.Draft202012Validator(schema).is_valid(value)


def _arm_summary(arm: Sequence[Streamed]) -> dict:
    return {
        "requests": len(arm),
        "per_token_s": spread([s.per_token_s for s in arm]),
        "median_gap_s": spread([s.median_gap_s for s in arm]),
        "completion_tokens": spread([s.completion_tokens for s in arm]),
        "ttft_s": spread([s.first_token_s for s in arm]),
        "finish_reasons": dict(Counter(s.finish_reasons[0] for s in arm)),
    }


def time_grammar_mask(store: Path, repeats: int) -> dict:
    """The grammar's own work per token on the served tokenizer, in this process: for each token of
    VALID_ANSWER, what the engine adds to a constrained step (copy the logits row, mask it, check
    that a token is left, accept the token). Also each fresh matcher's creation and the schema's
    first, uncached compile."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from server.structured import GrammarCompiler, OutputConstraint

    tokenizer = AutoTokenizer.from_pretrained(store)
    vocab_size = AutoConfig.from_pretrained(store).vocab_size
    compiler = GrammarCompiler(tokenizer, vocab_size, eos_token_ids=_eos_ids(tokenizer, store))
    constraint = OutputConstraint("json_schema", SCHEMA)
    start = time.perf_counter()
    compiler.compile(constraint)
    compile_s = time.perf_counter() - start
    tokens = tokenizer.encode(VALID_ANSWER, add_special_tokens=False)
    logits = torch.randn(vocab_size)  # [V]
    created, per_token = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        matcher = compiler.matcher(constraint)
        created.append(time.perf_counter() - start)
        start = time.perf_counter()
        for token in tokens:
            row = logits.clone()
            matcher.mask_logits(row)
            if bool(torch.isneginf(row).all()):
                raise RuntimeError(
                    f"the grammar of {SCHEMA} allowed no token while replaying {VALID_ANSWER!r}"
                )
            matcher.accept(token)
        per_token.append((time.perf_counter() - start) / len(tokens))
        if not matcher.is_done:
            raise RuntimeError(f"{VALID_ANSWER!r} did not complete the grammar of {SCHEMA}")
    return {
        "vocab_size": vocab_size,
        "tokens": len(tokens),
        "compile_s": compile_s,
        "matcher_s": spread(created),
        "per_token_s": spread(per_token),
    }


def _eos_ids(tokenizer, store: Path) -> list[int]:
    """The ids that end a sequence, as the server counts them: the tokenizer's and the model's."""
    from transformers import GenerationConfig

    eos = {tokenizer.eos_token_id}
    try:
        model_eos = GenerationConfig.from_pretrained(store).eos_token_id
    except OSError:  # no generation_config.json
        model_eos = None
    eos |= set(model_eos) if isinstance(model_eos, list) else {model_eos}
    return sorted(e for e in eos if e is not None)
