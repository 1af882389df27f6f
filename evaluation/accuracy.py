"""What `taer eval` runs: exact-match accuracy per task of a checkpoint or a store, full or under
the experts a pattern retains (see :mod:`evaluation.pruned_eval`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from demo.evaluate import EvalResult, evaluate
from demo.suite import Suite
from evaluation.pruned_eval import SelectionEvaluator, SelectionPolicy, make_retriever
from expert_store.errors import BudgetError, CheckpointError, StoreError, TasksFileError
from expert_store.manifest import MANIFEST_FILE
from retrieval.calibrate import load_patterns_for_store


@dataclass(frozen=True, slots=True)
class EvalRun:
    """Which prompts one evaluation runs, how many per generate call, on which device."""

    split: str = "eval"
    limit: int | None = None
    batch_size: int = 32
    device: str = "cpu"


@dataclass(frozen=True, slots=True)
class RetrievalChoice:
    """How each prompt's pattern is retrieved: the matcher, and the index and encoder it uses."""

    matcher: str = "semantic"
    index_dir: Path | None = None
    encoder: Path | None = None


@dataclass(slots=True)
class LoadedModel:
    """What evaluation runs on; ``runtime`` is set when the model was loaded from a store."""

    model: object
    tokenizer: object
    runtime: object | None = None


def is_store(path: Path) -> bool:
    return (path / MANIFEST_FILE).is_file()


def tasks_file_for(model_dir: Path, tasks: Path | None, patterns: Path | None = None) -> Path:
    """The tasks file to use: the one given, the one a demo build keeps next to its model (or next to
    the checkpoint a store was sharded from), or the one the patterns were calibrated with."""
    if tasks is not None:
        return tasks
    candidates = [model_dir.parent / "tasks" / "tasks.yaml"]
    if is_store(model_dir):
        source = _read_json(model_dir / MANIFEST_FILE).get("source")
        if source:
            candidates.append(Path(source).parent / "tasks" / "tasks.yaml")
    if patterns is not None:
        recorded = _read_json(patterns / "patterns.json").get("metadata", {}).get("tasks_file")
        if recorded:
            candidates.append(Path(recorded))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise TasksFileError(f"no tasks file at {candidates[0]}; pass --tasks TASKS.yaml")


def _read_json(path: Path) -> dict:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return document if isinstance(document, dict) else {}


def load_model(model_dir: Path, *, device: str = "cpu", slots_per_layer: int | None = None) -> LoadedModel:
    """The model MODEL_DIR names: a store through the runtime, or a Hugging Face checkpoint directory."""
    if is_store(model_dir):
        from expert_store.runtime import RuntimeConfig, load_runtime

        try:
            runtime = load_runtime(model_dir, RuntimeConfig(device=device, slots_per_layer=slots_per_layer))
        except StoreError as error:
            raise StoreError(f"cannot load the store {model_dir} through the runtime: {error}") from error
        runtime.model.eval()
        return LoadedModel(runtime.model, runtime.tokenizer, runtime)
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir} is not a Hugging Face checkpoint directory (no config.json)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").to(device)
    return LoadedModel(model.eval(), tokenizer)


def evaluate_full(model_dir: Path, suite: Suite, run: EvalRun) -> EvalResult:
    """Every expert, the model's own routing."""
    loaded = load_model(model_dir, device=run.device)
    return evaluate(
        loaded.model, loaded.tokenizer, suite, split=run.split, limit=run.limit, batch_size=run.batch_size
    )


def evaluate_pruned(
    store_dir: Path,
    patterns_dir: Path,
    suite: Suite,
    tasks_file: Path,
    policy: SelectionPolicy,
    run: EvalRun,
    retrieval: RetrievalChoice | None = None,
) -> tuple[EvalResult, dict]:
    """Each task under the selection ``policy`` describes, or, with ``retrieval``, each prompt under
    the pattern retrieval picks for it: the result and its JSON document."""
    patterns = load_patterns_for_store(patterns_dir, store_dir)
    num_experts = patterns.general.stats.tcess.shape[1]
    # Exact mode: the budget is the device's slot count, and misses load on demand.
    slots = policy.budget.per_layer(num_experts) if policy.mode == "exact" else None
    if slots is not None and slots > num_experts:
        raise BudgetError(f"{policy.budget.describe()} asks for {slots} experts; the model has {num_experts}")
    loaded = load_model(store_dir, device=run.device, slots_per_layer=slots)
    evaluator = SelectionEvaluator(
        loaded.runtime, patterns, suite, split=run.split, limit=run.limit, batch_size=run.batch_size
    )
    if retrieval is None:
        result = evaluator.under(policy)
        document = result.to_json()
    else:
        retrieve = make_retriever(
            retrieval.matcher,
            loaded.runtime,
            patterns_dir,
            tasks_file,
            index_dir=retrieval.index_dir,
            encoder=retrieval.encoder,
        )
        retrieved = evaluator.retrieved(policy, retrieve)
        result, document = retrieved.result, retrieved.to_json()
        document["matcher"] = retrieval.matcher
    document["selection"] = policy.to_json()
    document["selection_description"] = policy.describe()
    document["split"] = run.split
    return result, document


def format_table(result: EvalResult, retrieval: dict | None = None) -> str:
    """Accuracy per task and the mean, with retrieval's accuracy per task when given."""
    width = max(len("mean"), *(len(name) for name in result.tasks))
    extra = f"  {'retrieved':>9}" if retrieval else ""
    lines = [f"{'task':<{width}}  {'accuracy':>8}  {'n':>5}{extra}"]
    for name, score in result.tasks.items():
        extra = f"  {100 * retrieval['tasks'][name]['retrieval_accuracy']:>8.1f}%" if retrieval else ""
        lines.append(f"{name:<{width}}  {100 * score.accuracy:>7.1f}%  {score.n:>5}{extra}")
    extra = f"  {'':>5}  {100 * retrieval['retrieval_accuracy']:>8.1f}%" if retrieval else ""
    lines.append(f"{'mean':<{width}}  {100 * result.mean:>7.1f}%{extra}")
    return "\n".join(lines)
