"""The tables of `taer bench api` from its JSON."""

from __future__ import annotations

from benchmarks.api_timing import describe
from benchmarks.common import markdown_table


def render(result: dict) -> str:
    return "\n\n".join(
        [
            "### Constrained decoding (response_format json_schema) vs free decoding, same prompts",
            _constrained(result),
            f"### n={result['samples']['samples']} samples in one request vs as many concurrent requests",
            _samples(result["samples"]),
            "Absolute times are this machine's (and only indicative on a shared CPU); the ratios of "
            "back-to-back pairs are the result. Spreads are p25-p75.",
        ]
    )


def _constrained(result: dict) -> str:
    part, mask = result["constrained"], result["mask"]
    settings, prompts = result["settings"]["constrained"], result["settings"]["prompts"]
    rows = []
    for name, label in (("free", "free"), ("constrained", "json_schema")):
        arm = part["arms"][name]
        valid = _validity(part, arm) if name == "constrained" and part["pairs"] else "-"
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(arm["finish_reasons"].items()))
        rows.append(
            [
                label,
                arm["requests"],
                describe(arm["completion_tokens"]),
                describe(arm["per_token_s"], 1e3),
                describe(arm["median_gap_s"], 1e3),
                describe(arm["ttft_s"], 1e3),
                reasons,
                valid,
            ]
        )
    headers = [
        "arm",
        "requests",
        "tokens",
        "decode ms/token (whole answer)",
        "median token gap ms",
        "TTFT ms",
        "finish",
        "valid JSON",
    ]
    ratio = part["ratio"]
    target = result["targets"][0]
    verdict = "not measured" if target["met"] is None else "met" if target["met"] else "**MISSED**"
    lines = [
        markdown_table(headers, rows),
        f"Constrained / free decode time per token at the same positions (each answer's first tokens, "
        f"as many as the shorter has), {ratio['count']} back-to-back pairs: **{describe(ratio, unit='x')}**; "
        f"target <= {target['bound']}x: {verdict}. Over each whole answer (the lengths differ): "
        f"{describe(part['whole_answer_ratio'], unit='x')}; of their median token gaps: "
        f"{describe(part['median_gap_ratio'], unit='x')}. "
        f"Both arms: temperature {settings['temperature']}, max_tokens {settings['max_tokens']}, "
        "stopping at the end token (the constrained arm also when its JSON closes); "
        f"{settings['rounds']} rounds over {prompts} prompts.",
        _mask_line(mask, part["arms"]["free"]["per_token_s"]["median"]),
    ]
    return "\n\n".join(lines)


def _mask_line(mask: dict, free_step_s: float | None) -> str:
    per_token = mask["per_token_s"]["median"]
    share = f"{per_token / free_step_s:.1%} of a free decode step" if free_step_s else "no free step measured"
    return (
        f"The grammar's own work in a hot loop in this process (server.structured Matcher, vocabulary "
        f"{mask['vocab_size']:,}: copy the logits row, mask it, check a token is left, accept it): "
        f"{describe(mask['per_token_s'], 1e6, ' us')} per token, {share}. A lower bound: the same steps run "
        "slower in the engine, between two forwards. A fresh matcher "
        f"{describe(mask['matcher_s'], 1e6, ' us')}; the schema's first compile "
        f"{mask['compile_s'] * 1e3:.1f} ms (cached afterwards)."
    )


def _samples(part: dict) -> str:
    n = part["samples"]
    rows = []
    for name, label in (("one", f"1 request, n={n}"), ("separate", f"{n} concurrent requests, n=1")):
        arm = part["arms"][name]
        rows.append(
            [
                label,
                part["rounds"],
                describe(arm["tokens"]),
                describe(arm["wall_s"], 1e3),
                describe(arm["tokens_per_s"]),
                describe(arm["every_first_token_s"], 1e3),
                describe(arm["prompt_tokens"]),
            ]
        )
    headers = [
        "arm",
        "rounds",
        "tokens",
        "wall ms",
        "tokens/s",
        "every sample's first token ms",
        "prompt tokens prefilled",
    ]
    one, separate = (part["arms"][a]["prompt_tokens"]["median"] for a in ("one", "separate"))
    return "\n\n".join(
        [
            markdown_table(headers, rows),
            f"n={n} / {n} separate, paired by round: tokens/s **{describe(part['tokens_per_s_ratio'], unit='x')}**, "
            f"wall time {describe(part['wall_ratio'], unit='x')}, every sample's first token "
            f"{describe(part['every_first_token_ratio'], unit='x')}. The n={n} request prefills its prompt once "
            f"({one:g} prompt tokens against {separate:g}). Samples equal to the separate request seeded seed + i: "
            f"{part['samples_equal_to_separate']}/{part['samples_compared']}.",
        ]
    )


def _validity(part: dict, arm: dict) -> str:
    """Valid of all, then of those that stopped by themselves (the rest were cut at max_tokens)."""
    stopped = arm["finish_reasons"].get("stop", 0)
    return (
        f"{part['valid']}/{part['pairs']} ({part['valid'] / part['pairs']:.0%}), "
        f"{part['valid']} of the {stopped} that stopped; {part['parsed']} parse"
    )
