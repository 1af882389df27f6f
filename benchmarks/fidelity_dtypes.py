"""`taer bench fidelity --expert-dtypes bfloat16,int8,float8`: the fidelity of 8-bit experts.

The checkpoint's experts are stored in each expert dtype (``taer shard --expert-dtype``, one store
per dtype under a work directory) and each store is calibrated on the tasks file: patterns are keyed
by the store's fingerprint, which covers every expert's checksum, so an int8 store cannot use the
bfloat16 store's patterns; each is calibrated as a user would calibrate it. Every arm computes in
bfloat16, so the arms differ only in how their experts are stored: bfloat16 weights, or 8 bits with
a float32 scale per output channel (expert_store/quant.py).

At each keep (100/50/25% by default) every task is evaluated under its own TCESS pattern (the
oracle task, as the fidelity table's ``tcess`` row): exact-match accuracy, and its share of the
bfloat16 arm's (target: at least 99.5%, issue 13). The logit difference to bfloat16 (max and mean)
is measured on the prefill of each task's first eval prompts under the bfloat16 store's retained set
for the task, so both arms run the same experts and the difference is the experts' quantization
alone; beside it, how many tasks retain exactly those experts under the arm's own patterns, and, for
scale, the difference between the checkpoint's float32 store computing in float32 and the bfloat16
arm: what bfloat16 itself changes.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from demo.suite import Example, Suite
from evaluation.pruned_eval import SelectionEvaluator, SelectionPolicy, selection_for
from expert_store.errors import CheckpointError, PatternError, StoreError
from expert_store.manifest import MANIFEST_FILE, Manifest
from expert_store.quant import EXPERT_DTYPES as SHARD_EXPERT_DTYPES
from expert_store.runtime import MoERuntime, RuntimeConfig, load_runtime
from expert_store.shard import shard_checkpoint
from retrieval.calibrate import CalibrationOptions, calibrate, load_patterns_for_store
from retrieval.patterns import PatternSet
from retrieval.selection import Budget, Selection
from retrieval.service import to_layers

logger = logging.getLogger(__name__)

BASELINE = "bfloat16"
# `taer shard --expert-dtype` choices compared: "source" would be the checkpoint's dtype, which
# computing in bfloat16 casts to bfloat16 anyway
EXPERT_DTYPES = tuple(name for name in SHARD_EXPERT_DTYPES if name != "source")
COMPUTE_DTYPE = "bfloat16"  # every arm's: the 8-bit experts stand in for bfloat16 ones
DTYPE_KEEPS = (1.0, 0.5, 0.25)
TARGET_SHARE = 0.995
LOGIT_PROMPTS = 8  # per task


@dataclass(frozen=True, slots=True)
class DtypeFidelityConfig:
    """What to compare. ``limit``: eval prompts per task (the first N of the split)."""

    expert_dtypes: tuple[str, ...] = EXPERT_DTYPES
    keeps: tuple[float, ...] = DTYPE_KEEPS
    split: str = "eval"
    limit: int | None = 100
    batch_size: int = 64
    device: str = "cpu"

    def __post_init__(self) -> None:
        unknown = [d for d in self.expert_dtypes if d not in EXPERT_DTYPES]
        if unknown:
            raise CheckpointError(_unknown(unknown))
        # The baseline every ratio is to runs first (its retained sets and logits are the reference).
        ordered = dict.fromkeys((BASELINE, *self.expert_dtypes))
        object.__setattr__(self, "expert_dtypes", tuple(ordered))


def parse_expert_dtypes(text: str) -> tuple[str, ...]:
    """``bfloat16,int8,float8`` (a comma list, as the flag takes it) -> the dtypes."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in EXPERT_DTYPES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(_unknown(unknown))
    return names


def _unknown(names: Sequence[str]) -> str:
    return f"unknown expert dtype(s) {list(names)}; compare any of {','.join(EXPERT_DTYPES)}"


@dataclass(slots=True)
class _Baseline:
    """The bfloat16 arm's prompts per task, and its retained sets and logits per (keep, task): what
    every arm's logits are compared with."""

    examples: dict[str, list[Example]] = field(default_factory=dict)
    selections: dict[tuple[float, str], Selection | None] = field(default_factory=dict)
    logits: dict[tuple[float, str], torch.Tensor] = field(default_factory=dict)

    def record(self, runtime: MoERuntime, keep: float, task: str, examples: list[Example], selection) -> None:
        self.examples[task], self.selections[keep, task] = examples, selection
        self.logits[keep, task] = _prefill_logits(runtime, examples, selection)

    def differences(self, runtime: MoERuntime, keep: float) -> torch.Tensor:
        """|logit - the baseline's| of every prompt token of every task at ``keep``, under the
        baseline's retained sets: [every logit]."""
        return torch.cat(
            [
                (_prefill_logits(runtime, examples, self.selections[keep, task]) - self.logits[keep, task])
                .abs()
                .flatten()
                for task, examples in self.examples.items()
            ]
        )


def compare_expert_dtypes(
    checkpoint: Path,
    tasks_file: Path,
    suite: Suite,
    work: Path,
    config: DtypeFidelityConfig,
    float32_store: Path | None = None,
) -> dict:
    """Shard, calibrate and evaluate every expert dtype of ``config``; the JSON-able comparison.
    ``float32_store`` (the checkpoint's float32 store, if there is one) gives the logit differences
    a scale: what computing in bfloat16 itself changes."""
    checkpoint, work = Path(checkpoint), Path(work)
    arms, rows, counts, baseline = [], [], {}, _Baseline()
    for expert_dtype in config.expert_dtypes:
        store, patterns, calibrated = prepare_arm(checkpoint, tasks_file, work, expert_dtype, config.device)
        runtime = load_runtime(store, RuntimeConfig(device=config.device, dtype=COMPUTE_DTYPE))
        try:
            arms.append(_arm_info(runtime, expert_dtype, calibrated))
            evaluator = SelectionEvaluator(
                runtime, patterns, suite, split=config.split, limit=config.limit, batch_size=config.batch_size
            )
            counts = evaluator.counts
            layout = runtime.layout
            keeps = [k for k in config.keeps if Budget(keep=k).per_layer(layout.num_experts) >= layout.top_k]
            rows += [_measure(evaluator, expert_dtype, keep, baseline) for keep in keeps]
        finally:
            runtime.close()
    _add_shares(arms, rows)
    reference = None if float32_store is None else _float32_reference(float32_store, baseline, config.device)
    return {
        "checkpoint": str(checkpoint),
        "work": str(work),
        "compute_dtype": COMPUTE_DTYPE,
        "baseline": BASELINE,
        "split": config.split,
        "n": counts,
        "logit_prompts_per_task": LOGIT_PROMPTS,
        "arms": arms,
        "rows": rows,
        "float32_reference": reference,
        "targets": dtype_targets(rows),
    }


def _float32_reference(store: Path, baseline: _Baseline, device: str) -> list[dict]:
    """Per keep, the float32 store computing in float32 against the bfloat16 arm's logits, under the
    same retained sets: the difference bfloat16 itself makes, beside which the 8-bit arms' is read."""
    runtime = load_runtime(store, RuntimeConfig(device=device, dtype="float32"))
    try:
        rows = []
        for keep in dict.fromkeys(keep for keep, _ in baseline.logits):
            differences = baseline.differences(runtime, keep)
            rows.append(
                {
                    "keep": keep,
                    "max_logit_diff_vs_bfloat16": float(differences.max()),
                    "mean_logit_diff_vs_bfloat16": float(differences.mean()),
                }
            )
    finally:
        runtime.close()
    return rows


def _arm_info(runtime: MoERuntime, expert_dtype: str, calibrated: bool) -> dict:
    bank = next(iter(runtime.cache.banks.values()))
    return {
        "expert_dtype": expert_dtype,
        "slots_hold": runtime.expert_dtype,
        "bytes_per_expert": bank.nbytes_per_slot,
        "store": str(runtime.store.store_dir),
        "calibrated_now": calibrated,
    }


def prepare_arm(
    checkpoint: Path, tasks_file: Path, work: Path, expert_dtype: str, device: str
) -> tuple[Path, PatternSet, bool]:
    """(store, its patterns, whether they were calibrated now) of one expert dtype under ``work``:
    the store is sharded again when the checkpoint is newer, the patterns calibrated again when they
    were made for another store or tasks file."""
    store, patterns_dir = work / f"store-{expert_dtype}", work / f"patterns-{expert_dtype}"
    if not _store_is_current(store, checkpoint):
        logger.info("sharding %s -> %s (experts %s)", checkpoint, store, expert_dtype)
        shard_checkpoint(checkpoint, store, force=True, expert_dtype=expert_dtype)
    try:
        patterns = load_patterns_for_store(patterns_dir, store)
        if patterns.metadata.get("tasks_file") == str(Path(tasks_file).resolve()):
            return store, patterns, False
    except (PatternError, StoreError):
        pass
    logger.info("calibrating %s with %s", store, tasks_file)
    options = CalibrationOptions(device=device, dtype=COMPUTE_DTYPE)
    return store, calibrate(store, tasks_file, patterns_dir, options), True


def _store_is_current(store: Path, checkpoint: Path) -> bool:
    try:
        manifest = Manifest.load(store)
    except (OSError, StoreError, ValueError):
        return False
    newest = max(path.stat().st_mtime for path in checkpoint.iterdir() if path.is_file())
    is_newer = (store / MANIFEST_FILE).stat().st_mtime >= newest
    return manifest.source == str(checkpoint.resolve()) and is_newer


def _measure(evaluator: SelectionEvaluator, expert_dtype: str, keep: float, baseline: _Baseline) -> dict:
    """One row: the arm at one keep, each task under its own TCESS pattern; its logits against the
    baseline's under the baseline's retained sets (which this arm records when it is the baseline)."""
    budget = Budget(keep=keep)
    result = evaluator.under(SelectionPolicy(budget))
    runtime, same_sets = evaluator.runtime, 0
    for name in evaluator.names:
        own = _selection(evaluator.patterns, budget, name, runtime.layout.num_experts)
        if expert_dtype == BASELINE:
            baseline.record(runtime, keep, name, evaluator.examples[name][:LOGIT_PROMPTS], own)
        same_sets += own == baseline.selections[keep, name]
    differences = baseline.differences(runtime, keep)
    spread = torch.cat([baseline.logits[keep, name].flatten() for name in baseline.examples]).std()
    return {
        "expert_dtype": expert_dtype,
        "keep": keep,
        "experts_per_layer": budget.per_layer(runtime.layout.num_experts),
        "tasks": {name: score.accuracy for name, score in result.tasks.items()},
        "mean": result.mean,
        "max_logit_diff_vs_bfloat16": float(differences.max()),
        "mean_logit_diff_vs_bfloat16": float(differences.mean()),
        "bfloat16_logit_std": float(spread),
        "same_sets_as_bfloat16": same_sets,
    }


def _selection(patterns: PatternSet, budget: Budget, task: str, num_experts: int) -> Selection | None:
    """The task's TCESS retained set; None when the budget keeps every expert (the full model)."""
    if budget.per_layer(num_experts) >= num_experts:
        return None
    return selection_for(patterns, SelectionPolicy(budget), task)


@torch.inference_mode()
def _prefill_logits(
    runtime: MoERuntime, examples: Sequence[Example], selection: Selection | None
) -> torch.Tensor:
    """Float32 logits [real tokens, V] of the chat-rendered prompts' prefill under ``selection``."""
    if selection is None:
        runtime.activate_all()
    else:
        runtime.activate(to_layers(selection, runtime.layout.moe_layers), "pruned")
    tokenizer = runtime.tokenizer
    texts = [
        tokenizer.apply_chat_template(e.chat(), add_generation_prompt=True, tokenize=False) for e in examples
    ]
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = padding_side
    inputs = inputs.to(runtime.device)
    logits = runtime.model(**inputs).logits  # [B, S, V]
    return logits[inputs["attention_mask"].bool()].float().cpu()  # [real tokens, V]


def _add_shares(arms: list[dict], rows: list[dict]) -> None:
    """Each arm's bytes and each row's accuracy as shares of the bfloat16 arm's."""
    base_bytes = next(a["bytes_per_expert"] for a in arms if a["expert_dtype"] == BASELINE)
    for arm in arms:
        arm["bytes_vs_bfloat16"] = arm["bytes_per_expert"] / base_bytes
    base = {r["keep"]: r["mean"] for r in rows if r["expert_dtype"] == BASELINE}
    for row in rows:
        row["share_of_bfloat16"] = row["mean"] / base[row["keep"]] if base.get(row["keep"]) else None


def dtype_targets(rows: list[dict]) -> list[dict]:
    """Every 8-bit arm at every keep: at least 99.5% of the bfloat16 arm's mean accuracy."""
    targets = []
    for row in rows:
        if row["expert_dtype"] == BASELINE:
            continue
        measured = row.get("share_of_bfloat16")
        targets.append(
            {
                "name": f"{row['expert_dtype']} experts at keep {row['keep']:.0%} >= "
                f"{TARGET_SHARE:.1%} of bfloat16 experts' mean accuracy",
                "measured": measured,
                "threshold": TARGET_SHARE,
                "met": None if measured is None else measured >= TARGET_SHARE,
            }
        )
    return targets
