"""`taer bench discover`'s refinement part: do patterns refined from served requests move toward
the patterns a full calibration gives?

Each task's calibration prompts are shuffled with a seed and halved. Patterns (and their retrieval
index) are calibrated on the first halves; an in-process engine serves the second halves' queries
in exact mode with `--record` on (one token each: what is recorded is the prompt's prefill), each
request routed by retrieval as any request is; `taer calibrate --refine`'s library step then merges
the records into the half-calibrated patterns, at each weight. Reported at one budget (keep 25% by
default), every task under its own pattern (``SelectionEvaluator.under``): the accuracy of the
half-calibrated, refined and full-calibration patterns side by side, the full model's, how far each
pattern set's TCESS lies from the full calibration's and how many of its retained experts the full
calibration's retained sets share.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True, slots=True)
class RefineInputs:
    """The demo's store, fully calibrated patterns and tasks file."""

    store: Path
    patterns: Path
    tasks_file: Path
    encoder_dir: Path | None = None


def run_refine(
    inputs: RefineInputs,
    work: Path,
    keep: float = 0.25,
    weights: tuple[float, ...] = (0.25, 0.5, 1.0),
    seeds: tuple[int, ...] = (0, 1, 2),
    limit: int | None = None,
    batch_size: int = 64,
    device: str = "cpu",
) -> dict:
    """The refinement part (see the module docstring) for each seed's halving of the calibration
    prompts; its working files stay under ``work``."""
    runs = [
        run_refine_once(inputs, work / f"seed-{seed}", keep, weights, seed, limit, batch_size, device)
        for seed in seeds
    ]
    return {"keep": keep, "weights": list(weights), "seeds": list(seeds), "runs": runs}


def run_refine_once(
    inputs: RefineInputs,
    work: Path,
    keep: float,
    weights: tuple[float, ...],
    seed: int,
    limit: int | None,
    batch_size: int,
    device: str,
) -> dict:
    """One seed's halving: calibrate, serve and record, refine at each weight, evaluate."""
    from retrieval.build import build_index_for_tasks
    from retrieval.calibrate import CalibrationOptions, calibrate
    from retrieval.refine import RefineOptions, refine_patterns

    half_file, served = split_calibration(inputs.tasks_file, work / "half-tasks", seed)
    half = work / "half-patterns"
    calibrate(inputs.store, half_file, half, CalibrationOptions(device=device))
    build_index_for_tasks(half_file, half, encoder_path=inputs.encoder_dir)
    records = work / "records"
    started = time.perf_counter()
    serving = asyncio.run(serve_and_record(inputs.store, half, served, records, device, inputs.encoder_dir))
    serving["seconds"] = time.perf_counter() - started
    arms = {"half": half}
    refined = {}
    for weight in weights:
        out = work / f"refined-{weight:g}"
        options = RefineOptions(weight, min_requests=1)  # the bench sets how many each task gets
        result = refine_patterns(half, records, inputs.store, options, out=out)
        arms[f"refined w={weight:g}"] = out
        refined[f"{weight:g}"] = {name: result.moved(name) for name in result.refined}
    arms["full"] = inputs.patterns
    report = evaluate_arms(inputs, arms, keep, limit, batch_size, device)
    return {"seed": seed, "serving": serving, "moved": refined} | report


def split_calibration(tasks_file: Path, out: Path, seed: int) -> tuple[Path, list[tuple[str, dict]]]:
    """A tasks file of the first half of each task's calibration prompts (shuffled with ``seed``),
    its other files as the original's; and the second halves' lines, each with its task."""
    from retrieval.tasks_file import load_tasks_file

    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    entries, served = {}, []
    document = yaml.safe_load(tasks_file.read_text())["tasks"]
    for spec in load_tasks_file(tasks_file):
        source = tasks_file.parent / document[spec.name]["calibration"]
        lines = [line for line in source.read_text().splitlines() if line.strip()]
        rng.shuffle(lines)
        kept, rest = lines[: len(lines) // 2], lines[len(lines) // 2 :]
        (out / f"{spec.name}.jsonl").write_text("\n".join(kept) + "\n")
        entry = {"calibration": f"{spec.name}.jsonl", "examples": list(spec.examples)}
        for split in ("eval", "heldout"):
            path = getattr(spec, f"{split}_path")
            if path is not None:
                entry[split] = str(path.resolve())
        entries[spec.name] = entry
        served += [(spec.name, json.loads(line)) for line in rest]
    half_file = out / "tasks.yaml"
    half_file.write_text(yaml.safe_dump({"tasks": entries}, sort_keys=False))
    return half_file, served


async def serve_and_record(
    store: Path,
    patterns: Path,
    served: list[tuple[str, dict]],
    records: Path,
    device: str,
    encoder_dir: Path | None,
) -> dict:
    """Serve each line's query (one greedy token) in exact mode with recording on; how many
    requests, and how many retrieval sent to their own task."""
    from retrieval.calibrate import prompt_text
    from retrieval.routing_record import read_records
    from retrieval.tasks_file import CalibrationPrompt
    from server.engine import TaerEngine
    from server.engine_api import GenerationRequest, SamplingParams
    from server.loading import ServeConfig, load_engine_parts
    from server.metrics import Metrics
    from server.record_files import RecordOptions

    config = ServeConfig(store, patterns, keep=0.5, mode="exact", device=device, encoder=encoder_dir)
    engine = TaerEngine(lambda: load_engine_parts(config), record=RecordOptions(records, with_text=True))
    await engine.start(Metrics().engine)
    await asyncio.to_thread(engine.wait_ready, 600)
    try:
        tokenizer, truth = engine.tokenizer, {}
        requests = []
        for number, (task, line) in enumerate(served):
            prompt = CalibrationPrompt(
                messages=_messages(line.get("messages")), prompt=line.get("prompt"), response=None
            )
            text = prompt_text(tokenizer, prompt, with_response=False)  # as a request renders it
            ids = tokenizer.encode(text, add_special_tokens=False)
            query = prompt.query_text
            sampling = SamplingParams(max_tokens=1, temperature=0)
            requests.append(GenerationRequest(f"served-{number}", ids, query, sampling))
            truth[f"served-{number}"] = task

        async def serve(request) -> None:
            async for _ in engine.generate(request):
                pass

        await asyncio.gather(*(serve(request) for request in requests))
    finally:
        await engine.shutdown()
    found = list(read_records(records))
    return {
        "requests": len(requests),
        "recorded": len(found),
        "retrieved_own_task": sum(record.task == truth[record.request_id] for record in found),
    }


def _messages(messages: list[dict] | None):
    from retrieval.tasks_file import ChatMessage

    return None if messages is None else tuple(ChatMessage(m["role"], m["content"]) for m in messages)


def evaluate_arms(
    inputs: RefineInputs, arms: dict[str, Path], keep: float, limit: int | None, batch_size: int, device: str
) -> dict:
    """Accuracy at ``keep`` of each pattern set (every task under its own pattern), the full
    model's, and each set's distance to the full calibration's."""
    from demo.suite import load_suite
    from evaluation.pruned_eval import SelectionEvaluator, SelectionPolicy
    from expert_store.runtime import RuntimeConfig, load_runtime
    from retrieval.calibrate import load_patterns_for_store
    from retrieval.selection import Budget

    suite = load_suite(inputs.tasks_file)
    loaded = {arm: load_patterns_for_store(directory, inputs.store) for arm, directory in arms.items()}
    runtime = load_runtime(inputs.store, RuntimeConfig(device=device))
    policy = SelectionPolicy(Budget(keep=keep))
    rows = []
    try:
        full_model = None
        for arm, patterns in loaded.items():
            evaluator = SelectionEvaluator(runtime, patterns, suite, limit=limit, batch_size=batch_size)
            result = evaluator.under(policy)
            if full_model is None:
                full_model = evaluator.full()
            rows.append(
                {
                    "patterns": arm,
                    "accuracy": result.mean,
                    "per_task": {name: score.accuracy for name, score in result.tasks.items()},
                }
                | distance(patterns, loaded["full"], Budget(keep=keep))
            )
        counts = evaluator.counts
    finally:
        runtime.close()
    return {
        "prompts_per_task": counts,
        "full_model": full_model.mean,
        "full_model_per_task": {name: score.accuracy for name, score in full_model.tasks.items()},
        "rows": rows,
    }


def distance(patterns, full, budget) -> dict:
    """Mean over tasks of sum |TCESS - full's| / sum |full's|, and the share of the full
    calibration's retained experts that ``patterns`` retains too (per task, every layer)."""
    gaps, shared = [], []
    for task in full.tasks:
        mine, theirs = patterns.get(task).stats.tcess, full.get(task).stats.tcess
        gaps.append(float((mine - theirs).abs().sum() / theirs.abs().sum()))
        a, b = patterns.select(task, budget), full.select(task, budget)
        same = sum(len(set(a.experts(row)) & set(b.experts(row))) for row in b.layers)
        shared.append(same / sum(len(b.experts(row)) for row in b.layers))
    return {
        "tcess_gap_to_full": sum(gaps) / len(gaps),
        "retained_shared_with_full": sum(shared) / len(shared),
    }


TARGET_WEIGHT = 0.5
TARGET_POINTS = 1.0


def summarize(report: dict) -> list[dict]:
    """Per pattern set, over the seeds: mean, lowest and highest accuracy, per-task mean accuracy,
    mean TCESS gap and retained share with the full calibration."""
    runs = report["runs"]
    rows = []
    for position, first in enumerate(runs[0]["rows"]):
        arm = [run["rows"][position] for run in runs]
        accuracy = [row["accuracy"] for row in arm]
        rows.append(
            {
                "patterns": first["patterns"],
                "accuracy": sum(accuracy) / len(accuracy),
                "lowest": min(accuracy),
                "highest": max(accuracy),
                "per_task": {task: _mean(row["per_task"][task] for row in arm) for task in first["per_task"]},
                "tcess_gap_to_full": _mean(row["tcess_gap_to_full"] for row in arm),
                "retained_shared_with_full": _mean(row["retained_shared_with_full"] for row in arm),
            }
        )
    return rows


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def refine_target(report: dict) -> dict:
    """The refined patterns (weight 0.5, or the first weight measured) within a point of the full
    calibration's accuracy, or above it, in the mean over the halvings."""
    weight = TARGET_WEIGHT if TARGET_WEIGHT in report["weights"] else report["weights"][0]
    rows = {row["patterns"]: row for row in summarize(report)}
    gap = 100 * (rows[f"refined w={weight:g}"]["accuracy"] - rows["full"]["accuracy"])
    return {
        "name": f"refined patterns (w={weight:g}) within {TARGET_POINTS:g} point of the full calibration at "
        f"keep {report['keep']:.0%} (mean of {len(report['runs'])} halvings; half calibration: "
        f"{100 * (rows['half']['accuracy'] - rows['full']['accuracy']):+.1f} points)",
        "measured": gap,
        "threshold": -TARGET_POINTS,
        "met": gap >= -TARGET_POINTS,
    }
