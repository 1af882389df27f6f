"""`taer eval MODEL_DIR`: exact-match accuracy per task, greedy decoding.

The model comes from :func:`load_model`, the one place that turns the argument into a model object;
expert selections (patterns, stores) plug in there and through ``evaluate``'s ``before_task`` hook.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from demo.evaluate import EvalResult, evaluate
from demo.suite import SPLITS, load_suite
from expert_store.errors import CheckpointError, StoreError, TasksFileError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="exact-match accuracy of a checkpoint on a task suite",
        description="Greedy, batched evaluation of MODEL_DIR on each task's evaluation prompts.",
    )
    parser.add_argument(
        "model_dir", type=Path, metavar="MODEL_DIR", help="a Hugging Face checkpoint directory"
    )
    parser.add_argument(
        "--tasks", type=Path, help="tasks.yaml (default: MODEL_DIR/../tasks/tasks.yaml when it exists)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--limit", type=int, help="evaluate at most N prompts per task")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per generate call (default 32)")
    parser.add_argument(
        "--split", choices=[s for s in SPLITS if s != "calibration"], default="eval", help="which prompts"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.set_defaults(func=run)


def tasks_file_for(model_dir: Path, tasks: Path | None) -> Path:
    """The tasks file to use: the one given, or the one a demo build keeps next to its model."""
    if tasks is not None:
        return tasks
    default = model_dir.parent / "tasks" / "tasks.yaml"
    if not default.is_file():
        raise TasksFileError(f"no tasks file at {default}; pass --tasks TASKS.yaml")
    return default


def load_model(model_dir: Path, *, device: str = "cpu"):
    """The model and tokenizer that MODEL_DIR names (a Hugging Face checkpoint directory)."""
    if (model_dir / "manifest.json").is_file():
        raise StoreError(
            f"{model_dir} is a taer store; evaluating a store needs the runtime, which is not available "
            "yet: pass the original Hugging Face checkpoint directory instead"
        )
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir} is not a Hugging Face checkpoint directory (no config.json)")
    # Imported here so that `taer --help` does not pay for transformers.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").to(device)
    return model.eval(), tokenizer


def format_table(result: EvalResult) -> str:
    width = max(len("mean"), *(len(name) for name in result.tasks))
    lines = [f"{'task':<{width}}  {'accuracy':>8}  {'n':>5}"]
    for name, score in result.tasks.items():
        lines.append(f"{name:<{width}}  {100 * score.accuracy:>7.1f}%  {score.n:>5}")
    lines.append(f"{'mean':<{width}}  {100 * result.mean:>7.1f}%")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    suite = load_suite(tasks_file_for(args.model_dir, args.tasks))
    model, tokenizer = load_model(args.model_dir, device=args.device)
    result = evaluate(model, tokenizer, suite, split=args.split, limit=args.limit, batch_size=args.batch_size)
    print(json.dumps(result.to_json()) if args.json else format_table(result))
    return 0
