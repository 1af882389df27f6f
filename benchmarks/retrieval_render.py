"""The retrieval benchmark's markdown: top-1 accuracy, matcher latency, end to end, latency, targets."""

from __future__ import annotations

from benchmarks.common import markdown_table
from benchmarks.retrieval_latency import render_latency_markdown

# semantic_plain: the semantic vote on the encoder's vectors, without the task space.
MATCHERS = ("semantic", "semantic_plain", "router")


def render_retrieval_markdown(report: dict) -> str:
    """Top-1 accuracy, matcher latency, end-to-end accuracy, the latency tables, then the targets."""
    top1 = report["top1"]
    tasks = list(top1["semantic"]["tasks"])
    lines = [
        f"Model `{report['model']['store']}` ({report['model']['family']}), task index of "
        f"{report['model']['index_size']} texts; prompts: split `{report['split']}` (held-out phrasings, "
        f"{top1['semantic']['in_index']} of {top1['semantic']['n']} found verbatim in the index).",
        "",
        "Top-1 task accuracy (%):",
        "",
    ]
    rows = [[task, *(f"{100 * top1[m]['tasks'][task]:.1f}" for m in MATCHERS)] for task in tasks]
    rows.append(["all", *(f"{100 * top1[m]['accuracy']:.1f} (n={top1[m]['n']})" for m in MATCHERS)])
    lines += [markdown_table(["task", *MATCHERS], rows), ""]
    lines.append(
        f"Semantic fallbacks to `general` (counted as misses): {top1['semantic']['fallbacks']}; the vote's "
        f"winner before the fallback rule is right for {100 * top1['semantic']['candidate_accuracy']:.1f}%."
    )
    if "out_of_domain_general" in top1["semantic"]:
        shares = ", ".join(
            f"{m} {100 * top1[m]['out_of_domain_general']:.0f}%"
            for m in MATCHERS
            if "out_of_domain_general" in top1[m]
        )
        lines.append(
            f"Requests of none of these tasks (20 general questions) served by `general`: {shares} "
            "(the router matcher always picks a task)."
        )
    latency = report["matcher_latency"]
    lines += [
        "",
        "Single-query matcher latency on this index (ms; semantic_plain = the same vote without the task "
        "space; router = partial forward to the first router):",
        "",
        markdown_table(
            ["matcher", "p50", "p99", "calls"],
            [
                [m, f"{latency[m]['p50_ms']:.2f}", f"{latency[m]['p99_ms']:.2f}", latency[m]["calls"]]
                for m in MATCHERS
            ],
        ),
        "",
    ]
    if report.get("router_check"):
        lines += _router_check_lines(report["router_check"])
    for split, part in report["end_to_end"].items():
        lines += _end_to_end_lines(split, part)
    lines += ["Embed + search latency:", ""]
    lines += [render_latency_markdown(report["latency"])]
    if "encoders" in report:
        lines += [render_encoders_markdown(report["encoders"])]
    lines += ["Targets:", ""]
    lines += [_target_line(t) for t in report["targets"]]
    return "\n".join(lines) + "\n"


def _end_to_end_lines(split: str, part: dict) -> list[str]:
    n = part["n"]
    lines = [
        f"End to end on the `{split}` prompts (n = {min(n.values())}-{max(n.values())} per task; full model "
        f"{100 * part['full']['mean']:.1f}%): mean accuracy (%) with each prompt served by the pattern retrieved "
        "for it, against each task's own pattern (oracle); in brackets, points from the oracle:",
        "",
    ]
    served = [*MATCHERS, *(["semantic_checked"] if "semantic_checked" in part["rows"][0] else [])]
    rows = [
        [
            f"{row['keep']:.0%}",
            f"{100 * row['oracle']['mean']:.1f}",
            *(f"{100 * row[m]['mean']:.1f} ({row[f'{m}_minus_oracle_points']:+.1f})" for m in served),
            *(f"{100 * row[m]['retrieval_accuracy']:.1f}" for m in MATCHERS),
        ]
        for row in part["rows"]
    ]
    headers = ["keep", "oracle", *served, *(f"{m} top-1" for m in MATCHERS)]
    return [*lines, markdown_table(headers, rows), ""]


def _router_check_lines(part: dict) -> list[str]:
    """Per keep and split: top-1 before and after the router check, what it caught and moved."""

    def pct(value) -> str:
        return "-" if value is None else f"{100 * value:.1f}"

    rows = []
    for row in part["rows"]:
        for split, effect in row["splits"].items():
            rows.append(
                [
                    f"{row['keep']:.0%}",
                    split,
                    pct(effect["top1_before"]),
                    pct(effect["top1_after"]),
                    pct(effect["exact_after"]),
                    f"{pct(effect['caught'])} of {effect['wrong_retrievals']}",
                    f"{pct(effect['wrongly_moved'])} of {effect['right_retrievals']}",
                    pct(effect["router_alone_top1"]),
                ]
            )
    lines = [
        "Router check after the semantic pick (each prompt prefilled with its pick's pattern; re-routed "
        "when another task's calibration prompts fit its own router choices better by more than the "
        "margin): "
        "top-1 (%) before and after (exact: sent to exact mode, neither right nor wrong), wrong "
        "retrievals caught (%), right ones wrongly moved (%), and the router alone as a matcher:",
        "",
        markdown_table(
            ["keep", "split", "top-1 before", "after", "exact", "caught", "wrongly moved", "router alone"],
            rows,
        ),
        "",
    ]
    for row in part["rows"]:
        ood, latency = row["out_of_domain"], row["latency"]
        state = "on" if row["on_when_serving"] else "OFF when serving (measured as if on)"
        lines.append(
            f"- keep {row['keep']:.0%}: check {state}; validated on the {row['validated_on']}: the router "
            f"alone right for {pct(row['router_accuracy'])}%, {pct(row['validation_wrongly_rerouted'])}% "
            f"re-routed away from their own task; margin {row['margin']:.3f}; out-of-domain to the fallback "
            f"{pct(ood['fallback_before'])}% before, {pct(ood['fallback_or_exact_after'])}% to the fallback "
            f"or exact mode after (n={ood['n']}); added per request {latency.get('added_ms', 0):.2f} ms "
            f"(counting {latency.get('counting_ms', 0):.2f}, decision {latency.get('decide_ms', 0):.3f}) "
            f"against a prefill of {latency.get('prefill_ms', 0):.1f} ms: "
            f"{pct(latency.get('added_share'))}% (n={latency['n']}, medians, one prompt at a time)"
        )
    return [*lines, ""]


def _target_line(target: dict) -> str:
    if target["met"] is None:
        return f"- {target['name']}: not measured"
    measured = target["measured"]
    if "top-1" in target["name"] or "prefill" in target["name"]:
        shown = f"{100 * measured:.1f}%"
    elif "ms" in target["name"]:
        shown = f"{measured:.2f} ms"
    else:
        shown = f"{measured:+.1f} points"
    return f"- {target['name']}: {shown}, {'met' if target['met'] else 'NOT met'}"


def render_encoders_markdown(comparison: dict) -> str:
    """The encoder comparison: accuracy and size, latency ranges over the rounds, and the choice."""
    rows = comparison["encoders"]
    machine = comparison.get("machine")
    where = f"; times from this machine, {machine['cores']} CPU cores" if machine else ""
    lines = [
        f"Encoders side by side (index of each built from `{comparison['tasks_file']}`; torch threads "
        f"{comparison['torch_threads']}; {comparison['out_of_domain']} unrelated questions{where}):",
        "",
        markdown_table(
            [
                "encoder",
                "dim",
                "dtype",
                "weights MB",
                "params M",
                "held-out top-1",
                "eval top-1",
                "unrelated to general",
                "held-out top-1, fitted min_similarity",
            ],
            [
                [
                    r["encoder"],
                    r["dim"],
                    r["dtype"],
                    "-" if r["weight_bytes"] is None else f"{r['weight_bytes'] / 1e6:.0f}",
                    "-" if r["parameters"] is None else f"{r['parameters'] / 1e6:.0f}",
                    f"{100 * r['heldout']['accuracy']:.1f}% ({r['heldout']['fallbacks']} fallbacks)",
                    f"{100 * r['eval']['accuracy']:.1f}%",
                    f"{100 * r['ood_general']:.0f}%",
                    f"{100 * r['fitted']['heldout']:.1f}% at {r['fitted']['min_similarity']:.2f} "
                    f"({100 * r['fitted']['ood_general']:.0f}% unrelated)",
                ]
                for r in rows
            ],
        ),
        "",
        f"Embed + search + vote per call (ms), the encoders taking turns call by call; ranges over "
        f"{comparison['rounds']} rounds of {comparison['calls_per_round']} calls; a batch is that many "
        f"concurrent requests embedded together; ratios to `{rows[0]['encoder']}` in the same round:",
        "",
        markdown_table(
            ["encoder", "vectors", "batch", "p50", "p99", "p50 per request", f"p50 vs {rows[0]['encoder']}"],
            [
                [
                    r["encoder"],
                    f"{t['size']:,}",
                    t["batch"],
                    _span(t["p50_ms"]),
                    _span(t["p99_ms"]),
                    _span([v / t["batch"] for v in t["p50_ms"]]),
                    _span(t["p50_vs_first"], "x"),
                ]
                for t_index in range(len(rows[0]["latency"]))
                for r in rows
                for t in [r["latency"][t_index]]
            ],
        ),
        "",
    ]
    target, choice = comparison["target"], comparison["choice"]
    lines.append(
        f"Within the budget (single-request p99 <= {target['p99_ms']:.0f} ms at {target['size']:,} vectors in "
        f"every round): {', '.join(choice['within_budget']) or 'none'}; of those, >= {target['ood_general']:.0%} "
        f"of unrelated questions to general: {', '.join(choice['eligible']) or 'none'}. "
        f"Choice by this run: {choice['encoder'] or 'none (keep the default)'}."
    )
    return "\n".join(lines) + "\n"


def _span(values: list[float], unit: str = "") -> str:
    low, high = min(values), max(values)
    return f"{low:.2f}{unit}" if f"{low:.2f}" == f"{high:.2f}" else f"{low:.2f}-{high:.2f}{unit}"
