"""The markdown of `taer bench discover` (:mod:`benchmarks.discover`)."""

from __future__ import annotations

from benchmarks.common import markdown_table

_RUN_COLUMNS = (
    "split",
    "seed",
    "prompts",
    "clusters (true)",
    "ARI",
    "ARI tasks only",
    "purity",
    "task prompts -> general",
    "unrelated -> general",
    "s",
)


def render_discover(report: dict) -> str:
    """Clusters against the truth per split and seed, the clusters of one run, accuracy, targets."""
    runs = report["runs"]
    lines = [
        f"### Discovered clusters vs the demo's {len(report['tasks'])} tasks (unlabelled, shuffled, "
        f"+ {runs[0]['unrelated'] if runs else 0} unrelated questions)",
        "",
        markdown_table(_RUN_COLUMNS, [_run_row(run) for run in runs]),
    ]
    first = next((r for r in runs if r["split"] == "calibration"), runs[0] if runs else None)
    if first is not None:
        lines += [
            "",
            f"Clusters found in the {first['split']} prompts (seed {first['seed']}), each with its most "
            "common true task:",
            "",
            markdown_table(
                ["discovered task", "prompts", "true task", "share"],
                [[name, m["size"], m["task"], m["share"]] for name, m in first["found"].items()],
            ),
        ]
    if report.get("accuracy"):
        lines += _accuracy_lines(report)
    targets = "; ".join(
        f"{t['name']}: {t['measured']:.3g} ({'met' if t['met'] else 'missed'})" for t in report["targets"]
    )
    return "\n".join([*lines, "", f"Targets: {targets}"]) + "\n"


def _run_row(run: dict) -> list:
    return [
        run["split"],
        run["seed"],
        run["prompts"],
        f"{run['clusters']} ({run['true_tasks']})",
        run["ari"],
        run["ari_task_prompts"],
        run["purity"],
        run["task_prompts_to_general"],
        f"{run['unrelated_to_general']} of {run['unrelated']}",
        round(run["seconds"], 1),
    ]


def _accuracy_lines(report: dict) -> list[str]:
    rows = [
        [f"{r['keep']:.0%}", r["full"], r["labelled"], r["discovered"], r["discovered_minus_labelled_points"]]
        for r in report["accuracy"]["rows"]
    ]
    return [
        "",
        "### Accuracy with discovered vs labelled patterns (evaluation prompts, each retrieved)",
        "",
        markdown_table(
            ["keep", "full model", "labelled", "discovered", "discovered - labelled (points)"], rows
        ),
        "",
        f"The discovered tasks are calibrated on {1 - report.get('held_out', 0):.0%} of their prompts (the "
        "rest held out), the labelled ones on all of theirs.",
    ]
