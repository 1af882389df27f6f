"""`taer eval MODEL_DIR_OR_STORE`: exact-match accuracy per task, greedy decoding.

MODEL_DIR is a Hugging Face checkpoint directory or a taer store (it has ``manifest.json``; it loads
through the runtime). With a store and ``--patterns DIR`` plus a budget, every task runs under a
retained set (see :mod:`evaluation.pruned_eval`): its own pattern by default (the oracle), one pattern for
all (``--task``), another table (``--scorer``), a random set (``--random``), or, with ``--retrieve``,
the pattern that retrieval picks for each prompt (held-out phrasings by default).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from demo.evaluate import EvalResult, evaluate
from demo.suite import SPLITS, load_suite
from expert_store.errors import BudgetError, CheckpointError, SelectionError, StoreError, TasksFileError

MANIFEST = "manifest.json"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="exact-match accuracy of a checkpoint or store on a task suite, full or pruned",
        description="Greedy, batched evaluation of MODEL_DIR (a checkpoint or a store) on each task's "
        "prompts; with --patterns, under the experts a pattern retains.",
    )
    parser.add_argument(
        "model_dir",
        type=Path,
        metavar="MODEL_DIR",
        help="a Hugging Face checkpoint directory or a taer store",
    )
    parser.add_argument(
        "--tasks",
        type=Path,
        help="tasks.yaml (default: MODEL_DIR/../tasks/tasks.yaml, the store's source checkpoint's, "
        "or the one the patterns were calibrated with)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--limit", type=int, help="evaluate at most N prompts per task")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per generate call (default 32)")
    parser.add_argument(
        "--split",
        choices=[s for s in SPLITS if s != "calibration"],
        help="which prompts (default eval; heldout with --retrieve)",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    pruning = parser.add_argument_group("pruned evaluation (a store only)")
    pruning.add_argument("--patterns", type=Path, help="patterns directory from `taer calibrate`")
    budget = pruning.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=float, help="fraction of experts retained per layer")
    budget.add_argument("--experts-per-layer", type=int, help="experts retained per layer")
    pruning.add_argument("--task", help="serve every task with this task's pattern")
    pruning.add_argument(
        "--scorer",
        choices=["tcess", "frequency", "mean_prob", "general"],
        default="tcess",
        help="table that ranks experts; general = the pooled pattern's TCESS (default tcess)",
    )
    pruning.add_argument("--random", type=int, metavar="SEED", help="a uniform random retained set")
    pruning.add_argument("--adaptive", action="store_true", help="more experts to flatter layers")
    pruning.add_argument(
        "--mode",
        choices=["pruned", "exact"],
        default="pruned",
        help="pruned: routing restricted to the retained set; exact: the model's own routing with the "
        "budget as the slot count, misses loaded on demand (default pruned)",
    )
    pruning.add_argument(
        "--retrieve", action="store_true", help="serve each prompt with the pattern retrieval picks"
    )
    pruning.add_argument(
        "--matcher",
        choices=["semantic", "router"],
        default="semantic",
        help="semantic: sentence embeddings in the task index; router: the PreMoe paper's first-MoE-layer "
        "router signature, built under PATTERNS/router_matcher on first use (default semantic)",
    )
    pruning.add_argument("--index", type=Path, help="task index (default PATTERNS/index)")
    pruning.add_argument("--encoder", type=Path, help="sentence-transformers model directory")
    parser.set_defaults(func=run)


def is_store(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def tasks_file_for(model_dir: Path, tasks: Path | None, patterns: Path | None = None) -> Path:
    """The tasks file to use: the one given, the one a demo build keeps next to its model (or next to
    the checkpoint a store was sharded from), or the one the patterns were calibrated with."""
    if tasks is not None:
        return tasks
    candidates = [model_dir.parent / "tasks" / "tasks.yaml"]
    if is_store(model_dir):
        source = _read_json(model_dir / MANIFEST).get("source")
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


@dataclass(slots=True)
class LoadedModel:
    """What evaluation runs on; ``runtime`` is set when the model was loaded from a store."""

    model: object
    tokenizer: object
    runtime: object | None = None


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
    # Imported here so that `taer --help` does not pay for transformers.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").to(device)
    return LoadedModel(model.eval(), tokenizer)


def format_table(result: EvalResult, retrieval: dict | None = None) -> str:
    width = max(len("mean"), *(len(name) for name in result.tasks))
    extra = f"  {'retrieved':>9}" if retrieval else ""
    lines = [f"{'task':<{width}}  {'accuracy':>8}  {'n':>5}{extra}"]
    for name, score in result.tasks.items():
        extra = f"  {100 * retrieval['tasks'][name]['retrieval_accuracy']:>8.1f}%" if retrieval else ""
        lines.append(f"{name:<{width}}  {100 * score.accuracy:>7.1f}%  {score.n:>5}{extra}")
    extra = f"  {'':>5}  {100 * retrieval['retrieval_accuracy']:>8.1f}%" if retrieval else ""
    lines.append(f"{'mean':<{width}}  {100 * result.mean:>7.1f}%{extra}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    _check_arguments(args)
    split = args.split or ("heldout" if args.retrieve else "eval")
    tasks_file = tasks_file_for(args.model_dir, args.tasks, args.patterns)
    suite = load_suite(tasks_file)
    if args.patterns is None:
        loaded = load_model(args.model_dir, device=args.device)
        result = evaluate(
            loaded.model, loaded.tokenizer, suite, split=split, limit=args.limit, batch_size=args.batch_size
        )
        print(json.dumps(result.to_json()) if args.json else format_table(result))
        return 0
    result, document = _run_pruned(args, suite, split, tasks_file)
    if args.json:
        print(json.dumps(document))
    else:
        print(f"# {document['selection_description']}, split={split}")
        print(format_table(result, document if args.retrieve else None))
    return 0


def _run_pruned(args: argparse.Namespace, suite, split: str, tasks_file: Path) -> tuple[EvalResult, dict]:
    """Evaluate under the selection the arguments describe: the result and its JSON document."""
    from evaluation.pruned_eval import SelectionEvaluator, SelectionPolicy, make_retriever
    from retrieval.calibrate import load_patterns_for_store
    from retrieval.selection import Budget

    policy = SelectionPolicy(
        budget=Budget(keep=args.keep, experts_per_layer=args.experts_per_layer),
        scorer=args.scorer,
        task=args.task,
        random_seed=args.random,
        adaptive=args.adaptive,
        mode=args.mode,
    )
    patterns = load_patterns_for_store(args.patterns, args.model_dir)
    num_experts = patterns.general.stats.tcess.shape[1]
    # Exact mode: the budget is the device's slot count, and misses load on demand.
    slots = policy.budget.per_layer(num_experts) if args.mode == "exact" else None
    if slots is not None and slots > num_experts:
        raise BudgetError(f"{policy.budget.describe()} asks for {slots} experts; the model has {num_experts}")
    loaded = load_model(args.model_dir, device=args.device, slots_per_layer=slots)
    evaluator = SelectionEvaluator(
        loaded.runtime, patterns, suite, split=split, limit=args.limit, batch_size=args.batch_size
    )
    if not args.retrieve:
        result = evaluator.under(policy)
        document = result.to_json()
    else:
        retrieve = make_retriever(
            args.matcher,
            loaded.runtime,
            args.patterns,
            tasks_file,
            index_dir=args.index,
            encoder=args.encoder,
        )
        retrieved = evaluator.retrieved(policy, retrieve)
        result, document = retrieved.result, retrieved.to_json()
        document["matcher"] = args.matcher
    document["selection"] = policy.to_json()
    document["selection_description"] = policy.describe()
    document["split"] = split
    return result, document


def _check_arguments(args: argparse.Namespace) -> None:
    pruning = {
        "--keep": args.keep is not None,
        "--experts-per-layer": args.experts_per_layer is not None,
        "--task": args.task is not None,
        "--random": args.random is not None,
        "--adaptive": args.adaptive,
        "--retrieve": args.retrieve,
        "--scorer": args.scorer != "tcess",
        "--mode": args.mode != "pruned",
    }
    given = [flag for flag, is_set in pruning.items() if is_set]
    if args.patterns is None:
        if given:
            raise SelectionError(f"{', '.join(given)} need(s) --patterns DIR (and MODEL_DIR a store)")
        return
    if not is_store(args.model_dir):
        raise StoreError(
            f"{args.model_dir} is not a taer store; pruned evaluation runs on a store: "
            f"`taer shard {args.model_dir} STORE_DIR` first"
        )
    if args.keep is None and args.experts_per_layer is None:
        raise BudgetError("--patterns needs a budget: --keep FRACTION or --experts-per-layer N")
    if args.retrieve and (args.task is not None or args.random is not None or args.scorer == "general"):
        raise SelectionError(
            "--retrieve picks each prompt's pattern; it takes no --task, --random or --scorer general"
        )
