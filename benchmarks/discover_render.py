"""The markdown of `taer bench discover` (:mod:`benchmarks.discover`)."""

from __future__ import annotations

from benchmarks.common import markdown_table
from benchmarks.discover_refine import summarize

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
    if report.get("refine"):
        lines += _refine_lines(report["refine"])
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


def _refine_lines(refine: dict) -> list[str]:
    rows = summarize(refine)
    runs = refine["runs"]
    tasks = list(rows[0]["per_task"])
    served = runs[0]["serving"]
    keep = f"{refine['keep']:.0%}"
    full_model = sum(run["full_model"] for run in runs) / len(runs)
    return [
        "",
        f"### Refinement from served requests (accuracy at keep {keep}, each task under its own pattern, "
        f"mean of {len(runs)} halvings)",
        "",
        markdown_table(
            ["patterns", "accuracy", "lowest", "highest", "TCESS gap to full", "retained shared with full"],
            [
                [
                    r["patterns"],
                    r["accuracy"],
                    r["lowest"],
                    r["highest"],
                    r["tcess_gap_to_full"],
                    r["retained_shared_with_full"],
                ]
                for r in rows
            ],
        ),
        "",
        markdown_table(
            ["patterns", *tasks], [[r["patterns"], *(r["per_task"][t] for t in tasks)] for r in rows]
        ),
        "",
        f"half: calibrated on half of each task's calibration prompts (a seeded shuffle per halving); the other "
        f"half ({served['requests']} requests) served in exact mode with recording on, one token each "
        f"({served['recorded']} recorded, {served['retrieved_own_task']} retrieved to their own task, first "
        f"halving); refined w=W: `taer calibrate --refine` at weight W; full: calibrated on every prompt. "
        f"The full model scores {full_model:.3g}. TCESS gap: sum |TCESS - full's| / sum |full's|, mean over "
        f"tasks; retained shared: the share of the full calibration's retained experts at keep {keep} kept too. "
        "A record holds the prompt's tokens (the prefill) while calibration also counts each response's.",
    ]
