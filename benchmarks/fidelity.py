"""`taer bench fidelity`: pruned vs full accuracy per task and scorer, on the demo model by default.

For every keep fraction (only those that retain at least top-k experts per layer) and every way of
choosing the retained set, each task is evaluated under it (greedy, exact match, pruned routing):

- ``tcess``: the task's own TCESS pattern, uniform per layer (the oracle task: no retrieval);
- ``tcess_adaptive``: the same total, spread over layers by how flat each layer's TCESS is;
- ``frequency`` / ``mean_prob``: the task's top-k frequency or mean router probability tables;
- ``general``: the pooled pattern's TCESS, one set for every task;
- ``random``: uniform random sets, the mean over several seeds (the floor).

Everything runs in one process on one runtime, so the ratios to the full model are side by side. The
report is a markdown table, JSON, a plot of mean accuracy against keep per scorer, and a heatmap of
every task's TCESS table. Targets (issue 4): TCESS at keep 50% >= 99% of the full model's mean
accuracy, at 25% >= 85%, and TCESS above frequency and random at 25%.
"""

from __future__ import annotations

import argparse
import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from benchmarks.common import machine_info, markdown_table, write_json
from benchmarks.demo_inputs import add_common_arguments, resolve_inputs, set_threads
from benchmarks.fidelity_plots import plot_accuracy, plot_tcess_heatmap
from demo.suite import Suite, load_suite
from evaluation.pruned_eval import SelectionEvaluator, SelectionPolicy, selection_for
from expert_store.runtime import RuntimeConfig, load_runtime
from retrieval.calibrate import load_patterns_for_store
from retrieval.patterns import PatternSet
from retrieval.selection import Budget

logger = logging.getLogger(__name__)

DEFAULT_KEEPS = (1.0, 0.75, 0.5, 0.25, 0.125)
SCORERS = ("tcess", "tcess_adaptive", "frequency", "mean_prob", "general", "random")
TARGET_KEEP_HIGH, TARGET_RATIO_HIGH = 0.5, 0.99
TARGET_KEEP_LOW, TARGET_RATIO_LOW = 0.25, 0.85


@dataclass(frozen=True, slots=True)
class FidelityConfig:
    """What to measure. ``limit``: prompts per task (the first N of the split)."""

    keeps: tuple[float, ...] = DEFAULT_KEEPS
    random_seeds: tuple[int, ...] = (0, 1, 2)
    split: str = "eval"
    limit: int | None = 100
    batch_size: int = 64
    device: str = "cpu"


def policies(scorer: str, budget: Budget, seeds: Sequence[int]) -> list[SelectionPolicy]:
    """The selection policies a scorer's row averages over (several only for ``random``)."""
    if scorer == "random":
        return [SelectionPolicy(budget, random_seed=seed) for seed in seeds]
    if scorer == "tcess_adaptive":
        return [SelectionPolicy(budget, adaptive=True)]
    return [SelectionPolicy(budget, scorer=scorer)]


def run_fidelity(
    store_dir: Path, patterns_dir: Path, suite: Suite, config: FidelityConfig = FidelityConfig()
) -> dict:
    """Measure every (keep, scorer) cell; returns the JSON-able report (see the module docstring)."""
    patterns = load_patterns_for_store(patterns_dir, store_dir)
    runtime = load_runtime(store_dir, RuntimeConfig(device=config.device))
    try:
        evaluator = SelectionEvaluator(
            runtime, patterns, suite, split=config.split, limit=config.limit, batch_size=config.batch_size
        )
        layout, family = runtime.layout, runtime.store.manifest.family
        full = evaluator.full()
        keeps = [k for k in config.keeps if Budget(keep=k).per_layer(layout.num_experts) >= layout.top_k]
        skipped = [k for k in config.keeps if k not in keeps]
        cells = [(keep, scorer) for keep in keeps for scorer in SCORERS]
        rows = [
            _measure_cell(evaluator, keep, scorer, config.random_seeds, full.mean)
            for keep, scorer in tqdm(cells, desc="fidelity", unit="cell")
        ]
    finally:
        runtime.close()
    return {
        "benchmark": "fidelity",
        "machine": {**machine_info(), "torch_threads": torch.get_num_threads()},
        "model": _model_info(store_dir, layout, family),
        "split": config.split,
        "n": evaluator.counts,
        "random_seeds": list(config.random_seeds),
        "skipped_keeps": skipped,
        "full": full.to_json(),
        "rows": rows,
        "tcess": _tcess_tables(patterns),
        "targets": fidelity_targets(full.mean, rows),
    }


def _measure_cell(
    evaluator: SelectionEvaluator, keep: float, scorer: str, seeds: Sequence[int], full_mean: float
) -> dict:
    """One row of the report: a scorer at a keep fraction, per task and mean (mean over seeds)."""
    budget = Budget(keep=keep)
    chosen = policies(scorer, budget, seeds)
    results = [evaluator.under(p) for p in chosen]
    mean = statistics.fmean(r.mean for r in results)
    tasks = {name: statistics.fmean(r.tasks[name].accuracy for r in results) for name in evaluator.names}
    same = None if scorer == "random" else _same_sets(evaluator.patterns, chosen[0], budget, evaluator.names)
    return {
        "scorer": scorer,
        "keep": keep,
        "experts_per_layer": budget.per_layer(evaluator.runtime.layout.num_experts),
        "tasks": tasks,
        "mean": mean,
        "relative": mean / full_mean if full_mean else None,
        "runs": [r.mean for r in results],
        "same_sets_as_tcess": same,
    }


def _same_sets(patterns: PatternSet, policy: SelectionPolicy, budget: Budget, names: list[str]) -> int:
    """How many tasks ``policy`` serves with exactly the experts that uniform TCESS retains."""
    reference = SelectionPolicy(budget)
    return sum(
        dict(selection_for(patterns, policy, name).experts_by_layer)
        == dict(selection_for(patterns, reference, name).experts_by_layer)
        for name in names
    )


def _model_info(store_dir: Path, layout, family: str) -> dict:
    return {
        "store": str(store_dir),
        "family": family,
        "moe_layers": list(layout.moe_layers),
        "num_experts": layout.num_experts,
        "top_k": layout.top_k,
    }


def _tcess_tables(patterns: PatternSet) -> dict[str, list[list[float]]]:
    names = [*patterns.tasks, "general"]
    return {name: patterns.get(name).stats.tcess.tolist() for name in names}


def _cell(rows: list[dict], scorer: str, keep: float) -> dict | None:
    return next((r for r in rows if r["scorer"] == scorer and r["keep"] == keep), None)


def fidelity_targets(full_mean: float, rows: list[dict]) -> list[dict]:
    """Each target with what was measured and whether it is met (None when not measured)."""
    targets = []
    for keep, ratio in ((TARGET_KEEP_HIGH, TARGET_RATIO_HIGH), (TARGET_KEEP_LOW, TARGET_RATIO_LOW)):
        cell = _cell(rows, "tcess", keep)
        measured = None if cell is None else cell["relative"]
        targets.append(
            {
                "name": f"TCESS at keep {keep:.0%} >= {ratio:.0%} of full mean accuracy",
                "measured": measured,
                "threshold": ratio,
                "met": None if measured is None else measured >= ratio,
            }
        )
    tcess = _cell(rows, "tcess", TARGET_KEEP_LOW)
    for other in ("frequency", "random"):
        cell = _cell(rows, other, TARGET_KEEP_LOW)
        measured = None if tcess is None or cell is None else tcess["mean"] - cell["mean"]
        targets.append(
            {
                "name": f"TCESS above {other} at keep {TARGET_KEEP_LOW:.0%} (mean accuracy difference)",
                "measured": measured,
                "threshold": 0.0,
                "met": None if measured is None else measured > 0.0,
                "same_sets": None if cell is None else cell["same_sets_as_tcess"],
            }
        )
    return targets


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
    for scorer in SCORERS:
        cells = [_cell(report["rows"], scorer, keep) for keep in keeps]
        summary.append([scorer, *(_pct_rel(c) for c in cells)])
    headers = [
        "scorer",
        *(f"keep {k:.1%} ({_cell(report['rows'], 'tcess', k)['experts_per_layer']})" for k in keeps),
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
    lines += ["Targets:", ""] + [_target_line(t) for t in report["targets"]]
    return "\n".join(lines) + "\n"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _pct_rel(cell: dict | None) -> str:
    if cell is None:
        return "-"
    relative = "" if cell["relative"] is None else f" ({100 * cell['relative']:.0f}%)"
    return f"{100 * cell['mean']:.1f}{relative}"


def _target_line(target: dict) -> str:
    if target["met"] is None:
        return f"- {target['name']}: not measured"
    measured = target["measured"]
    shown = f"{100 * measured:.1f}%" if target["threshold"] > 0 else f"{100 * measured:+.1f} points"
    line = f"- {target['name']}: {shown}, {'met' if target['met'] else 'NOT met'}"
    if target.get("same_sets"):
        line += f" (the same retained experts as TCESS for {target['same_sets']} task(s))"
    return line


def write_fidelity_report(report: dict, out_dir: Path, json_path: Path | None = None) -> dict[str, Path]:
    """Write the JSON (``json_path``, default OUT/fidelity.json), markdown and both plots."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": Path(json_path) if json_path else out_dir / "fidelity.json",
        "markdown": out_dir / "fidelity.md",
        "plot": out_dir / "fidelity_accuracy.png",
        "heatmap": out_dir / "tcess_heatmap.png",
    }
    write_json(paths["json"], report)
    paths["markdown"].write_text(render_fidelity_markdown(report))
    plot_accuracy(report, paths["plot"])
    plot_tcess_heatmap(report, paths["heatmap"])
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "fidelity")
    parser.add_argument("--keeps", type=float, nargs="+", default=list(DEFAULT_KEEPS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="random-set seeds")
    parser.add_argument("--limit", type=int, default=100, help="prompts per task (0: all)")
    parser.add_argument("--split", choices=["eval", "heldout"], default="eval")


def main(args: argparse.Namespace) -> int:
    set_threads(args)
    store, patterns, tasks = resolve_inputs(args)
    config = FidelityConfig(
        keeps=tuple(args.keeps),
        random_seeds=tuple(args.seeds),
        split=args.split,
        limit=args.limit or None,
        batch_size=args.batch_size,
        device=args.device,
    )
    report = run_fidelity(store, patterns, load_suite(tasks), config)
    paths = write_fidelity_report(report, args.out, args.json)
    print(render_fidelity_markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
