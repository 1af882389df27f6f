"""Exact-match evaluation of any Hugging Face causal LM on a task suite.

Greedy decoding, batched with left padding, prompts rendered with the tokenizer's own chat template.
Nothing here knows the demo model: a caller may pass a model whose experts are pruned or loaded into
slots, and ``before_task`` lets it switch the active expert selection before each task's prompts run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from demo.suite import Example, Suite
from demo.tasks import scorer_for
from expert_store.errors import TasksFileError

logger = logging.getLogger(__name__)

# Room past the longest reference answer, so a model that runs on is scored wrong rather than cut.
EXTRA_NEW_TOKENS = 4


@dataclass(frozen=True, slots=True)
class TaskScore:
    name: str
    correct: int
    n: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0


@dataclass(frozen=True, slots=True)
class EvalResult:
    """Per-task exact-match accuracy; ``mean`` is the unweighted mean over tasks."""

    tasks: dict[str, TaskScore] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        scores = list(self.tasks.values())
        return sum(s.accuracy for s in scores) / len(scores) if scores else 0.0

    def to_json(self) -> dict[str, object]:
        """The documented JSON shape: ``{"tasks": {NAME: {"accuracy", "n"}}, "mean"}``."""
        tasks = {name: {"accuracy": s.accuracy, "n": s.n} for name, s in self.tasks.items()}
        return {"tasks": tasks, "mean": self.mean}


def _render(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]) -> list[str]:
    return [
        tokenizer.apply_chat_template(e.chat(), add_generation_prompt=True, tokenize=False) for e in examples
    ]


@torch.inference_mode()
def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
) -> list[str]:
    """Greedy completions of ``examples`` (chat-rendered), decoded without special tokens."""
    device = next(model.parameters()).device
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers: list[str] = []
    try:
        for start in range(0, len(examples), batch_size):
            texts = _render(tokenizer, examples[start : start + batch_size])
            inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = output[:, inputs["input_ids"].shape[1] :]  # [B, new]
            answers.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = padding_side
    return answers


def _max_new_tokens(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]) -> int:
    lengths = [len(tokenizer(e.answer or "", add_special_tokens=False)["input_ids"]) for e in examples]
    return max(lengths) + EXTRA_NEW_TOKENS


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    suite: Suite,
    *,
    split: str = "eval",
    tasks: Sequence[str] | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    before_task: Callable[[str], None] | None = None,
    progress: bool = True,
) -> EvalResult:
    """Exact-match accuracy per task on ``split`` ("eval" or "heldout") of ``suite``.

    ``limit`` caps the prompts per task (the first N). ``before_task(name)`` runs before a task's
    prompts, e.g. to activate that task's expert selection. Tasks without labelled prompts in the split
    are skipped; a suite with none at all is an error.
    """
    names = list(tasks) if tasks is not None else suite.names
    unknown = [name for name in names if name not in suite.tasks]
    if unknown:
        raise TasksFileError(f"unknown task(s) {', '.join(unknown)}; the suite has {', '.join(suite.names)}")
    was_training = model.training
    model.eval()
    scores = {}
    for name in tqdm(names, desc=f"evaluating ({split})", disable=not progress):
        examples = [e for e in suite.tasks[name].split(split) if e.answer is not None][:limit]
        if not examples:
            logger.warning("task %s has no labelled %s prompts; skipped", name, split)
            continue
        if before_task is not None:
            before_task(name)
        predictions = generate_answers(
            model,
            tokenizer,
            examples,
            max_new_tokens=_max_new_tokens(tokenizer, examples),
            batch_size=batch_size,
        )
        score = scorer_for(name)
        correct = sum(score(p, e.answer) for p, e in zip(predictions, examples, strict=True))
        scores[name] = TaskScore(name, correct, len(examples))
    model.train(was_training)
    if not scores:
        raise TasksFileError(f"no task in the suite has labelled {split} prompts to evaluate")
    return EvalResult(scores)
