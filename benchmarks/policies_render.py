"""Targets, agreement and markdown for the policies benchmark (``benchmarks.policies``)."""

from __future__ import annotations

from collections.abc import Sequence

from benchmarks.common import markdown_table


def targets(result: dict) -> list[dict]:
    """The issue's targets per budget: (a) >= 0.95x (d) and >= 3x (c) tokens/s; (b) fewer misses than (c)."""
    reference = result["reference"]
    checks = []
    for budget in result["budgets"]:
        by = {p["policy"]: p for p in budget["policies"]}
        a, b, c = by["pruned"], by["prefetch"], by["lru"]
        keep = f"keep {budget['keep']:.0%}"
        checks += [
            _check(
                f"{keep}: (a) tokens/s >= 0.95x (d)",
                a["decode_tokens_per_s"] / reference["decode_tokens_per_s"],
                0.95,
            ),
            _check(
                f"{keep}: (a) tokens/s >= 3x (c)", a["decode_tokens_per_s"] / c["decode_tokens_per_s"], 3.0
            ),
            _check(
                f"{keep}: (b) misses/token < (c)", b["misses_per_token"], c["misses_per_token"], lower=True
            ),
        ]
    return checks


def _check(name: str, value: float, bound: float, lower: bool = False) -> dict:
    met = value < bound if lower else value >= bound
    return {"target": name, "measured": value, "bound": bound, "met": bool(met)}


def exact_agreement(result: dict) -> dict[str, float]:
    """Share of prompts whose exact-mode tokens equal the all-resident ones (exact routing must match)."""
    reference = result["reference"]["outputs"]
    shares = {}
    for budget in result["budgets"]:
        for p in budget["policies"]:
            if p["policy"] in ("prefetch", "lru"):
                same = sum(a == b for a, b in zip(p["outputs"], reference, strict=True))
                shares[f"{p['policy']}@{budget['keep']:.0%}"] = same / len(reference)
    return shares


def render(result: dict) -> str:
    """Markdown: settings, the side-by-side table with ratios to (d), and the targets."""
    ref = result["reference"]
    s = result["settings"]
    rows = [_row(ref, ref)]
    for budget in result["budgets"]:
        rows += [_row(p, ref) for p in budget["policies"]]
    agreement = exact_agreement(result)
    parts = [
        f"{s['prompts']} prompts ({', '.join(s['tasks'])}, interleaved), greedy, at most {s['max_new_tokens']} "
        f"new tokens, batch 1, {s['torch_threads']} torch thread(s); {s['moe_layers']} MoE layers x "
        f"{s['num_experts']} experts, top-{s['top_k']}; retrieval: {s['retrieval']}.\n",
        markdown_table(
            [
                "policy",
                "keep",
                "slots/layer",
                "expert MB",
                "tok/s vs (d)",
                "decode tok/s (this machine)",
                "TTFT ms p50",
                "retrieval+activate ms",
                "loads/token",
                "KB/token",
                "misses/token",
                "load ms/token",
                "hit rate",
                "accuracy",
                "task retrieved",
            ],
            rows,
        ),
        "\nExact-mode outputs identical to (d) (greedy tokens, per prompt): "
        + ", ".join(f"{k} {v:.0%}" for k, v in agreement.items()),
        "\n" + load_share(result),
        "\n" + render_targets(result["targets"]),
    ]
    return "\n".join(parts)


def load_share(result: dict) -> str:
    """How much of (c)'s decode time its on-demand loads take: the ceiling on what avoiding them saves."""
    parts = []
    for budget in result["budgets"]:
        c = next(p for p in budget["policies"] if p["policy"] == "lru")
        per_token_ms = 1e3 / c["decode_tokens_per_s"]
        share = min(c["load_ms_per_token"] / per_token_ms, 0.999)
        parts.append(
            f"keep {budget['keep']:.0%}: {c['load_ms_per_token']:.2f} ms of {per_token_ms:.1f} ms per token "
            f"({share:.0%}; removing every load would make it at most {1 / (1 - share):.2f}x faster)"
        )
    return (
        "Time (c) spends copying experts on demand, per generated token (this machine): "
        + "; ".join(parts)
        + "."
    )


def _row(p: dict, ref: dict) -> list:
    acc = "-" if p["accuracy"] is None else f"{p['accuracy']:.1%}"
    routed = "-" if p["retrieval_accuracy"] is None else f"{p['retrieval_accuracy']:.0%}"
    return [
        p["label"],
        f"{p['keep']:.0%}",
        p["slots_per_layer"],
        p["expert_memory_bytes"] / 1e6,
        f"{p['decode_tokens_per_s'] / ref['decode_tokens_per_s']:.2f}x",
        p["decode_tokens_per_s"],
        p["ttft_ms_p50"],
        p["retrieval_ms_mean"] + p["activation_ms_mean"],
        p["loads_per_token"],
        p["bytes_per_token"] / 1e3,
        p["misses_per_token"],
        p["load_ms_per_token"],
        f"{p['hit_rate']:.1%}",
        acc,
        routed,
    ]


def render_targets(checks: Sequence[dict]) -> str:
    lines = ["| target | measured | met |", "|---|---|---|"]
    for c in checks:
        measured = "not measured: " + str(c.get("note")) if c["measured"] is None else f"{c['measured']:.3g}"
        met = "yes" if c["met"] else "**MISSED**"
        lines.append(f"| {c['target']} | {measured} (bound {c['bound']:.3g}) | {met} |")
    return "\n".join(lines)
