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
from pathlib import Path
from typing import TYPE_CHECKING

from demo.suite import SPLITS, load_suite
from expert_store.errors import BudgetError, SelectionError, StoreError
from expert_store.manifest import MANIFEST_FILE
from expert_store.modes import ROUTING_MODES

if TYPE_CHECKING:
    from demo.evaluate import EvalResult


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
        choices=ROUTING_MODES,
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


def run(args: argparse.Namespace) -> int:
    from evaluation.accuracy import EvalRun, evaluate_full, format_table, tasks_file_for

    _check_arguments(args)
    split = args.split or ("heldout" if args.retrieve else "eval")
    tasks_file = tasks_file_for(args.model_dir, args.tasks, args.patterns)
    suite = load_suite(tasks_file)
    run = EvalRun(split, args.limit, args.batch_size, args.device)
    if args.patterns is None:
        result = evaluate_full(args.model_dir, suite, run)
        print(json.dumps(result.to_json()) if args.json else format_table(result))
        return 0
    result, document = _run_pruned(args, suite, run, tasks_file)
    if args.json:
        print(json.dumps(document))
    else:
        print(f"# {document['selection_description']}, split={split}")
        print(format_table(result, document if args.retrieve else None))
    return 0


def _run_pruned(args: argparse.Namespace, suite, run, tasks_file: Path) -> tuple[EvalResult, dict]:
    from evaluation.accuracy import RetrievalChoice, evaluate_pruned
    from evaluation.pruned_eval import SelectionPolicy
    from retrieval.selection import Budget

    policy = SelectionPolicy(
        budget=Budget(keep=args.keep, experts_per_layer=args.experts_per_layer),
        scorer=args.scorer,
        task=args.task,
        random_seed=args.random,
        adaptive=args.adaptive,
        mode=args.mode,
    )
    retrieval = RetrievalChoice(args.matcher, args.index, args.encoder) if args.retrieve else None
    return evaluate_pruned(args.model_dir, args.patterns, suite, tasks_file, policy, run, retrieval)


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
    if not (args.model_dir / MANIFEST_FILE).is_file():
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
