"""`taer bench discover`: does `taer discover` find the demo's tasks in its prompts, unlabelled?

1. Clusters against the truth: a split's prompts (the calibration prompts, and by default the
   evaluation prompts and the held-out phrasings as well) shuffled with a seed and stripped of their
   labels, plus the 20 questions of no task of `taer bench retrieval`, written as a JSONL log of
   chat request bodies and given to the library step of `taer discover`. Reported: the adjusted Rand
   index (scikit-learn's; the unrelated questions one true class, the general pool one found
   cluster), the ARI over the task prompts alone, purity (the share of the clustered task prompts
   that belong to their cluster's most common task), the clusters found against the true tasks,
   and where the unrelated questions went.
2. Accuracy (``--accuracy``): the demo's evaluation prompts, each served with the pattern that
   retrieval picks, at keep 50% and 25%: patterns calibrated on the tasks discovered in the
   calibration prompts (seed 0) and retrieved by their index, against the labelled tasks' patterns
   retrieved by theirs, and the full model.
3. Refinement (``--refine``): patterns calibrated on half of each task's calibration prompts, the
   other half served in exact mode with `taer serve --record` on, then refined from the records
   (:mod:`benchmarks.discover_refine`): accuracy at keep 25% of the half-calibrated, refined and
   fully calibrated patterns side by side, for three halvings.

Targets (issue 20): ARI >= 0.9 on the calibration prompts; discovered within 1 point of labelled;
the refined patterns' accuracy moves from the half calibration's toward the full calibration's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import machine_info, write_json
from benchmarks.demo_inputs import add_common_arguments, resolve_inputs, set_threads
from benchmarks.discover_refine import RefineInputs, refine_target, run_refine
from benchmarks.discover_render import render_discover
from benchmarks.retrieval import OUT_OF_DOMAIN
from demo.suite import Suite, load_suite
from expert_store.errors import TaerError
from retrieval.discover import DEFAULT_OPTIONS, NOISE, DiscoveryOptions
from retrieval.discover_tasks import DiscoveredTasks, discover_tasks
from retrieval.tasks_file import GENERAL

logger = logging.getLogger(__name__)

TARGET_ARI = 0.9
TARGET_POINTS = 1.0
UNRELATED = "unrelated"


def run_discover(
    tasks_file: Path,
    work: Path,
    splits: tuple[str, ...] = ("calibration", "eval", "heldout"),
    seeds: tuple[int, ...] = (0, 1, 2),
    options: DiscoveryOptions = DEFAULT_OPTIONS,
    held_out: float = 0.2,
    encoder_dir: Path | None = None,
) -> dict:
    """Part 1 for every split and seed; the discovered tasks files stay under ``work``."""
    from retrieval.encoder import Encoder

    suite = load_suite(tasks_file)
    encoder = Encoder.load(encoder_dir)
    runs = []
    for split in splits:
        truth = _truth(suite, split)
        for seed in seeds:
            log = _write_log(work / f"{split}-{seed}.jsonl", truth, seed)
            started = time.perf_counter()
            out = work / f"{split}-{seed}" / "tasks.yaml"
            found = discover_tasks(log, out, _seeded(options, seed), held_out, encoder=encoder)
            runs.append(
                {"split": split, "seed": seed, "seconds": time.perf_counter() - started}
                | score(found, truth, len(suite.names))
            )
    return {"tasks": suite.names, "runs": runs}


def _truth(suite: Suite, split: str) -> dict[str, str]:
    """Each distinct query text of ``split`` and the unrelated questions -> its true task."""
    truth = {example.query: name for name in suite.names for example in suite.tasks[name].split(split)}
    return truth | dict.fromkeys(OUT_OF_DOMAIN, UNRELATED)


def _write_log(path: Path, truth: dict[str, str], seed: int) -> Path:
    texts = list(truth)
    random.Random(seed).shuffle(texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"model": "demo", "messages": [{"role": "user", "content": t}]}) for t in texts]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _seeded(options: DiscoveryOptions, seed: int) -> DiscoveryOptions:
    return dataclasses.replace(options, seed=seed)


def score(found: DiscoveredTasks, truth: dict[str, str], num_tasks: int) -> dict:
    """ARI, purity, clusters and where the unrelated questions went, for one discovery."""
    from sklearn.metrics import adjusted_rand_score

    texts = found.log.texts
    true = np.array([truth[text] for text in texts])
    labels = found.discovery.labels  # [N], NOISE for the general pool
    names = [task.name for task in found.tasks]
    is_task = true != UNRELATED
    clustered = is_task & (labels != NOISE)
    majority, in_majority = {}, 0
    for c, name in enumerate(names):
        counts = Counter(true[clustered & (labels == c)].tolist())
        top, count = counts.most_common(1)[0] if counts else (UNRELATED, 0)
        share = count / max(sum(counts.values()), 1)
        majority[name] = {"size": int((labels == c).sum()), "task": top, "share": share}
        in_majority += count
    purity = in_majority / max(int(clustered.sum()), 1)
    went = Counter(GENERAL if label == NOISE else names[label] for label in labels[~is_task].tolist())
    return {
        "prompts": len(texts),
        "true_tasks": num_tasks,
        "clusters": len(names),
        "ari": float(adjusted_rand_score(true, labels)),
        "ari_task_prompts": float(adjusted_rand_score(true[is_task], labels[is_task])),
        "purity": purity,
        "task_prompts_to_general": int((is_task & (labels == NOISE)).sum()),
        "unrelated": int((~is_task).sum()),
        "unrelated_to_general": went.get(GENERAL, 0),
        "unrelated_went": dict(went),
        "silhouette": found.discovery.silhouette,
        "found": majority,
    }


@dataclass(frozen=True, slots=True)
class AccuracyInputs:
    """The demo's store, labelled patterns and tasks file, and a discovered tasks file to compare."""

    store: Path
    patterns: Path
    tasks_file: Path
    discovered: Path
    encoder_dir: Path | None = None


def run_accuracy(
    inputs: AccuracyInputs,
    work: Path,
    keeps: tuple[float, ...],
    limit: int | None,
    batch_size: int,
    device: str,
) -> dict:
    """Part 2: full, labelled-retrieved and discovered-retrieved accuracy at each keep."""
    from evaluation.pruned_eval import SelectionEvaluator, SelectionPolicy, make_retriever
    from expert_store.runtime import RuntimeConfig, load_runtime
    from retrieval.build import build_index_for_tasks
    from retrieval.calibrate import CalibrationOptions, calibrate, load_patterns_for_store
    from retrieval.selection import Budget

    store, discovered, encoder_dir = inputs.store, inputs.discovered, inputs.encoder_dir
    discovered_patterns = work / "discovered-patterns"
    calibrate(store, discovered, discovered_patterns, CalibrationOptions(device=device))
    build_index_for_tasks(discovered, discovered_patterns, encoder_path=encoder_dir)
    suite = load_suite(inputs.tasks_file)
    runtime = load_runtime(store, RuntimeConfig(device=device))
    try:
        arms = {
            "labelled": (inputs.patterns, inputs.tasks_file),
            "discovered": (discovered_patterns, discovered),
        }
        evaluators, retrievers = {}, {}
        for arm, (directory, file) in arms.items():
            evaluators[arm] = SelectionEvaluator(
                runtime, load_patterns_for_store(directory, store), suite, limit=limit, batch_size=batch_size
            )
            retrievers[arm] = make_retriever("semantic", runtime, directory, file, encoder=encoder_dir)
        full = evaluators["labelled"].full().mean
        rows = []
        for keep in keeps:
            if Budget(keep=keep).per_layer(runtime.layout.num_experts) < runtime.layout.top_k:
                continue
            policy = SelectionPolicy(Budget(keep=keep))
            row = {"keep": keep, "full": full}
            for arm in arms:
                row[arm] = evaluators[arm].retrieved(policy, retrievers[arm]).result.mean
            row["discovered_minus_labelled_points"] = 100 * (row["discovered"] - row["labelled"])
            rows.append(row)
        counts = evaluators["labelled"].counts
    finally:
        runtime.close()
    return {"prompts_per_task": counts, "rows": rows}


def discover_targets(report: dict) -> list[dict]:
    calibration = [run["ari"] for run in report["runs"] if run["split"] == "calibration"]
    targets = []
    if calibration:
        worst = min(calibration)
        targets.append(
            {
                "name": f"ARI >= {TARGET_ARI} on the calibration prompts (+ unrelated), worst of {len(calibration)} seeds",
                "measured": worst,
                "threshold": TARGET_ARI,
                "met": worst >= TARGET_ARI,
            }
        )
    for row in (report.get("accuracy") or {}).get("rows", []):
        gap = row["discovered_minus_labelled_points"]
        targets.append(
            {
                "name": f"discovered patterns within {TARGET_POINTS:g} point of labelled at keep {row['keep']:.0%}",
                "measured": gap,
                "threshold": -TARGET_POINTS,
                "met": gap >= -TARGET_POINTS,
            }
        )
    if report.get("refine"):
        targets.append(refine_target(report["refine"]))
    return targets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "discover")
    parser.add_argument(
        "--splits",
        nargs="+",
        default=["calibration", "eval", "heldout"],
        choices=["calibration", "eval", "heldout"],
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="shuffles of the log")
    parser.add_argument("--min-size", type=int, default=DEFAULT_OPTIONS.min_size)
    parser.add_argument(
        "--encoder", type=Path, metavar="NAME_OR_DIR", help="minilm (default), mpnet, or a model directory"
    )
    parser.add_argument("--held-out", type=float, default=0.2, help="share of each discovered task held out")
    parser.add_argument(
        "--accuracy",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="calibrate the tasks discovered in the calibration prompts and compare accuracy (default on)",
    )
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--limit", type=int, default=0, help="evaluation prompts per task (0: all)")
    parser.add_argument(
        "--refine",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="calibrate on half the calibration prompts, serve the other half with recording on, refine, "
        "and compare accuracy with the full calibration (default on)",
    )
    parser.add_argument(
        "--refine-keep", type=float, default=0.25, help="the budget the refinement is measured at"
    )
    parser.add_argument(
        "--refine-weights",
        type=float,
        nargs="+",
        default=[0.25, 0.5, 1.0],
        help="refinement weights compared",
    )
    parser.add_argument(
        "--refine-seeds", type=int, nargs="+", default=[0, 1, 2], help="halvings of the calibration prompts"
    )


def main(args: argparse.Namespace) -> int:
    set_threads(args)
    if args.accuracy and "calibration" not in args.splits:
        raise TaerError(
            "the accuracy part calibrates the tasks found in the calibration prompts: add that split or --no-accuracy"
        )
    store, patterns, tasks = resolve_inputs(args)
    options = DiscoveryOptions(min_size=args.min_size)
    with tempfile.TemporaryDirectory(prefix="taer-bench-discover-") as tmp:
        work = Path(tmp)
        report = {"benchmark": "discover", "machine": machine_info(), "tasks_file": str(tasks)}
        report["held_out"] = args.held_out
        report |= run_discover(tasks, work, args.splits, args.seeds, options, args.held_out, args.encoder)
        if args.accuracy:
            discovered = work / f"calibration-{args.seeds[0]}" / "tasks.yaml"
            report["accuracy"] = run_accuracy(
                AccuracyInputs(store, patterns, tasks, discovered, args.encoder),
                work,
                tuple(args.keeps),
                args.limit or None,
                args.batch_size,
                args.device,
            )
        if args.refine:
            report["refine"] = run_refine(
                RefineInputs(store, patterns, tasks, args.encoder),
                work / "refine",
                args.refine_keep,
                tuple(args.refine_weights),
                tuple(args.refine_seeds),
                args.limit or None,
                args.batch_size,
                args.device,
            )
    report["targets"] = discover_targets(report)
    out = Path(args.out)
    write_json(args.json or out / "discover.json", report)
    text = render_discover(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "discover.md").write_text(text)
    print(text)
    print(f"wrote {args.json or out / 'discover.json'}, {out / 'discover.md'}")
    return 0
