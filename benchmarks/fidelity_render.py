"""`taer bench fidelity`'s markdown: the scorer table (mean accuracy by keep, relative to the full
model, and every cell per task), the expert dtype comparison, and the targets."""

from __future__ import annotations

from benchmarks.common import markdown_table


def find_cell(rows: list[dict], scorer: str, keep: float) -> dict | None:
    """The row of ``scorer`` at ``keep``, if it was measured."""
    return next((r for r in rows if r["scorer"] == scorer and r["keep"] == keep), None)


def render_fidelity_markdown(report: dict) -> str:
    """A summary (mean accuracy, scorer by keep), every cell per task, and the targets."""
    full = report["full"]
    keeps = sorted({r["keep"] for r in report["rows"]}, reverse=True)
    model = report["model"]
    n = report["n"]
    lines = [
        f"Model `{model['store']}` ({model['family']}, {len(model['moe_layers'])} MoE layers x "
        f"{model['num_experts']} experts, top-{model['top_k']}); split `{report['split']}`, "
        f"n = {min(n.values())}-{max(n.values())} prompts per task ({sum(n.values())} in all); greedy, exact "
        f"match, pruned routing. Random: mean of seeds {report['random_seeds']}. "
        f"Full model mean accuracy: {100 * full['mean']:.1f}%.",
        "",
        "Mean accuracy (% of prompts; in brackets, relative to the full model):",
        "",
    ]
    summary = []
    for scorer in dict.fromkeys(r["scorer"] for r in report["rows"]):
        cells = [find_cell(report["rows"], scorer, keep) for keep in keeps]
        summary.append([scorer, *(_pct_rel(c) for c in cells)])
    headers = [
        "scorer",
        *(f"keep {k:.1%} ({find_cell(report['rows'], 'tcess', k)['experts_per_layer']})" for k in keeps),
    ]
    lines += [markdown_table(headers, summary), ""]
    names = list(full["tasks"])
    detail = [["full", "-", *(_pct(full["tasks"][t]["accuracy"]) for t in names), _pct(full["mean"])]]
    for row in report["rows"]:
        detail.append(
            [row["scorer"], f"{row['keep']:.1%}", *(_pct(row["tasks"][t]) for t in names), _pct(row["mean"])]
        )
    lines += ["Per task (accuracy %):", "", markdown_table(["scorer", "keep", *names, "mean"], detail), ""]
    if report["skipped_keeps"]:
        lines += [f"Skipped keeps (fewer experts than top-k): {report['skipped_keeps']}", ""]
    if "dtypes" in report:
        lines += [render_dtypes_markdown(report["dtypes"])]
    lines += ["Targets:", ""] + [target_line(t) for t in report["targets"]]
    return "\n".join(lines) + "\n"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _pct_rel(cell: dict | None) -> str:
    if cell is None:
        return "-"
    relative = "" if cell["relative"] is None else f" ({100 * cell['relative']:.0f}%)"
    return f"{100 * cell['mean']:.1f}{relative}"


def target_line(target: dict) -> str:
    """A target as a list item: what was measured and whether it is met."""
    if target["met"] is None:
        return f"- {target['name']}: not measured"
    measured = target["measured"]
    shown = f"{100 * measured:.1f}%" if target["threshold"] > 0 else f"{100 * measured:+.1f} points"
    line = f"- {target['name']}: {shown}, {'met' if target['met'] else 'NOT met'}"
    if target.get("same_sets"):
        line += f" (the same retained experts as TCESS for {target['same_sets']} task(s))"
    return line


def render_dtypes_markdown(comparison: dict) -> str:
    """The expert dtype table (accuracy, share of bfloat16, logits, bytes) and accuracy per task."""
    n = comparison["n"]
    arms = {a["expert_dtype"]: a for a in comparison["arms"]}
    lines = [
        f"Expert dtypes: `{comparison['checkpoint']}` sharded per dtype (`taer shard --expert-dtype`) "
        f"and calibrated per store; every arm computes in {comparison['compute_dtype']}. Each task under "
        f"its own TCESS pattern; split `{comparison['split']}`, n = {min(n.values())}-{max(n.values())} "
        f"prompts per task. Logit differences: every logit of the prefill of the first "
        f"{comparison['logit_prompts_per_task']} prompts per task under the bfloat16 store's retained sets "
        "(the same experts in both arms), beside the bfloat16 logits' standard deviation.",
        "",
    ]
    headers = [
        "expert dtype",
        "keep",
        "experts/layer",
        "slots hold",
        "bytes/expert (vs bf16)",
        "mean accuracy %",
        "share of bf16",
        "logit diff vs bf16: max / mean (bf16 std)",
        "tasks with bf16's sets",
    ]
    table = []
    for row in comparison["rows"]:
        arm = arms[row["expert_dtype"]]
        share = row["share_of_bfloat16"]
        table.append(
            [
                row["expert_dtype"],
                f"{row['keep']:.0%}",
                row["experts_per_layer"],
                arm["slots_hold"],
                f"{arm['bytes_per_expert']:,} ({arm['bytes_vs_bfloat16']:.3f}x)",
                f"{100 * row['mean']:.1f}",
                "-" if share is None else f"{100 * share:.1f}%",
                f"{row['max_logit_diff_vs_bfloat16']:.3g} / {row['mean_logit_diff_vs_bfloat16']:.2g} "
                f"({row['bfloat16_logit_std']:.3g})",
                f"{row['same_sets_as_bfloat16']}/{len(row['tasks'])}",
            ]
        )
    lines += [markdown_table(headers, table), ""]
    if comparison["float32_reference"]:
        scale = "; ".join(
            f"keep {r['keep']:.0%}: {r['max_logit_diff_vs_bfloat16']:.3g} / {r['mean_logit_diff_vs_bfloat16']:.2g}"
            for r in comparison["float32_reference"]
        )
        lines += [
            "For scale, what bfloat16 itself changes: the float32 store computing in float32 differs from "
            f"the bfloat16 arm by (max / mean) {scale}.",
            "",
        ]
    names = list(n)
    detail = [
        [r["expert_dtype"], f"{r['keep']:.0%}", *(f"{100 * r['tasks'][t]:.1f}" for t in names)]
        for r in comparison["rows"]
    ]
    lines += ["Per task (accuracy %):", "", markdown_table(["expert dtype", "keep", *names], detail)]
    return "\n".join(lines) + "\n"


def render_dtypes_report(comparison: dict) -> str:
    """``--dtypes-only``'s markdown: the expert dtype comparison and its targets."""
    targets = [target_line(t) for t in comparison["targets"]]
    return render_dtypes_markdown(comparison) + "\nTargets:\n\n" + "\n".join(targets) + "\n"
