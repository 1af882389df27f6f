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

``--expert-dtypes bfloat16,int8,float8`` adds the expert dtype as a column: the checkpoint's experts
stored in each dtype, at keep 100/50/25%, accuracy as a share of bfloat16's and the logit difference
(:mod:`benchmarks.fidelity_dtypes`); ``--dtypes-only`` runs that comparison alone.
"""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from benchmarks.common import machine_info, write_json
from benchmarks.demo_inputs import add_common_arguments, resolve_inputs, set_threads
from benchmarks.fidelity_dtypes import (
    DTYPE_KEEPS,
    EXPERT_DTYPES,
    DtypeFidelityConfig,
    compare_expert_dtypes,
    parse_expert_dtypes,
)
from benchmarks.fidelity_plots import plot_accuracy, plot_dtypes, plot_tcess_heatmap
from benchmarks.fidelity_render import find_cell, render_dtypes_report, render_fidelity_markdown
from demo.suite import Suite, load_suite
from evaluation.pruned_eval import SelectionEvaluator, SelectionPolicy, selection_for
from expert_store.errors import StoreError
from expert_store.manifest import Manifest
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


def fidelity_targets(full_mean: float, rows: list[dict]) -> list[dict]:
    """Each target with what was measured and whether it is met (None when not measured)."""
    targets = []
    for keep, ratio in ((TARGET_KEEP_HIGH, TARGET_RATIO_HIGH), (TARGET_KEEP_LOW, TARGET_RATIO_LOW)):
        cell = find_cell(rows, "tcess", keep)
        measured = None if cell is None else cell["relative"]
        targets.append(
            {
                "name": f"TCESS at keep {keep:.0%} >= {ratio:.0%} of full mean accuracy",
                "measured": measured,
                "threshold": ratio,
                "met": None if measured is None else measured >= ratio,
            }
        )
    tcess = find_cell(rows, "tcess", TARGET_KEEP_LOW)
    for other in ("frequency", "random"):
        cell = find_cell(rows, other, TARGET_KEEP_LOW)
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
    if "dtypes" in report:
        paths["dtypes_plot"] = plot_dtypes(report["dtypes"], out_dir / "fidelity_dtypes.png")
    return paths


def write_dtypes_report(comparison: dict, out_dir: Path, json_path: Path | None = None) -> dict[str, Path]:
    """``--dtypes-only``: the expert dtype comparison's JSON (default OUT/fidelity_dtypes.json),
    markdown and plot."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": Path(json_path) if json_path else out_dir / "fidelity_dtypes.json",
        "markdown": out_dir / "fidelity_dtypes.md",
        "plot": out_dir / "fidelity_dtypes.png",
    }
    write_json(paths["json"], comparison)
    paths["markdown"].write_text(render_dtypes_report(comparison))
    plot_dtypes(comparison, paths["plot"])
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "fidelity")
    parser.add_argument("--keeps", type=float, nargs="+", default=list(DEFAULT_KEEPS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="random-set seeds")
    parser.add_argument("--limit", type=int, default=100, help="prompts per task (0: all)")
    parser.add_argument("--split", choices=["eval", "heldout"], default="eval")
    dtypes = parser.add_argument_group("expert dtypes (the comparison runs only with --expert-dtypes)")
    dtypes.add_argument(
        "--expert-dtypes",
        type=parse_expert_dtypes,
        help=f"comma list of {','.join(EXPERT_DTYPES)}: the checkpoint's experts stored in each (taer shard "
        "--expert-dtype), each store calibrated, every arm computing in bfloat16; accuracy as a share of "
        "bfloat16's and the max logit difference (bfloat16 is always measured, as the baseline)",
    )
    dtypes.add_argument(
        "--dtype-keeps", type=float, nargs="+", default=list(DTYPE_KEEPS), help="keeps of the comparison"
    )
    dtypes.add_argument(
        "--checkpoint",
        type=Path,
        help="the checkpoint to shard (default: the one the store was sharded from, as its manifest says)",
    )
    dtypes.add_argument(
        "--dtype-work",
        type=Path,
        help="where the stores and patterns go (default DATA/bench-fidelity-dtypes)",
    )
    dtypes.add_argument("--dtypes-only", action="store_true", help="run only the expert dtype comparison")


def main(args: argparse.Namespace) -> int:
    set_threads(args)
    if args.dtypes_only and not args.expert_dtypes:
        raise SystemExit("--dtypes-only needs --expert-dtypes bfloat16,int8,float8")
    store, patterns, tasks = resolve_inputs(args)
    suite = load_suite(tasks)
    compare_dtypes = _dtype_comparison(args, store, tasks, suite) if args.expert_dtypes else None
    if args.dtypes_only:
        comparison = compare_dtypes()
        paths = write_dtypes_report(comparison, args.out, args.json)
        print(render_dtypes_report(comparison))
    else:
        config = FidelityConfig(
            keeps=tuple(args.keeps),
            random_seeds=tuple(args.seeds),
            split=args.split,
            limit=args.limit or None,
            batch_size=args.batch_size,
            device=args.device,
        )
        report = run_fidelity(store, patterns, suite, config)
        if compare_dtypes is not None:
            report["dtypes"] = compare_dtypes()
            report["targets"] += report["dtypes"].pop("targets")
        paths = write_fidelity_report(report, args.out, args.json)
        print(render_fidelity_markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _dtype_comparison(args: argparse.Namespace, store: Path, tasks: Path, suite: Suite) -> Callable[[], dict]:
    """The expert dtype comparison the flags ask for, its checkpoint checked before anything runs."""
    manifest = Manifest.load(store)
    checkpoint = args.checkpoint or Path(manifest.source)
    if not (checkpoint / "config.json").exists():
        raise StoreError(
            f"{checkpoint}, the checkpoint to shard per expert dtype, is not there; pass --checkpoint"
        )
    config = DtypeFidelityConfig(
        expert_dtypes=args.expert_dtypes,
        keeps=tuple(args.dtype_keeps),
        split=args.split,
        limit=args.limit or None,
        batch_size=args.batch_size,
        device=args.device,
    )
    work = args.dtype_work or Path(args.data) / "bench-fidelity-dtypes"
    # The store under test gives the logit differences a scale when it is this checkpoint's, in float32.
    is_float32 = (manifest.dtype, manifest.expert_scheme) == ("F32", "none")
    float32 = store if is_float32 and manifest.source == str(checkpoint.resolve()) else None
    return functools.partial(compare_expert_dtypes, checkpoint, tasks, suite, work, config, float32)
