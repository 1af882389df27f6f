"""Evaluation under expert selections: every task served by a retained set of a pattern.

``SelectionPolicy`` says how a task's retained set is chosen (which pattern, which table scores it,
the budget, uniform or adaptive, pruned or exact routing, or a random floor). ``SelectionEvaluator``
runs :func:`demo.evaluate.evaluate` on a store's runtime, activating the set before each task:

- ``full()``: every expert, the model's own routing (the reference);
- ``under(policy)``: each task with the pattern the policy picks for it (by default its own: the oracle);
- ``retrieved(policy, retrieve)``: each prompt with the pattern that retrieval picks for *that prompt*,
  so that retrieval errors cost what they cost; a task's prompts are grouped by retrieved task and
  each group runs under its own selection.

Results are memoised per (task, prompts, selection, mode): a budget that keeps every expert, or two
scorers that retain the same experts, are evaluated once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from demo.evaluate import EvalResult, TaskScore, evaluate
from demo.suite import Example, Suite, TaskData
from expert_store.errors import PatternError, SelectionError, TasksFileError, UnknownTaskError
from expert_store.modes import ROUTING_MODES, RoutingMode
from expert_store.runtime import MoERuntime
from retrieval.patterns import PatternSet
from retrieval.selection import Budget, Selection, random_selection
from retrieval.service import to_layers
from retrieval.tasks_file import GENERAL

logger = logging.getLogger(__name__)

Scorer = Literal["tcess", "frequency", "mean_prob", "general"]
SCORERS: tuple[str, ...] = ("tcess", "frequency", "mean_prob", "general")
# Query texts in, one task name per text out (``general`` when retrieval falls back, ``EXACT`` for a
# prompt the router check sends to exact mode).
Retrieve = Callable[[Sequence[str]], list[str]]
EXACT = "(exact)"  # not a task name: the prompt is served with the model's own routing


@dataclass(frozen=True, slots=True)
class SelectionPolicy:
    """How the retained set serving a task is chosen.

    ``scorer``: the pattern table that ranks experts (``general`` = TCESS of the pooled pattern, the
    same set for every task). ``task``: serve every task with this one pattern instead of its own.
    ``random_seed``: a uniform random set (the floor) instead of any pattern.
    """

    budget: Budget
    scorer: Scorer = "tcess"
    task: str | None = None
    random_seed: int | None = None
    adaptive: bool = False
    mode: RoutingMode = "pruned"

    def __post_init__(self) -> None:
        if self.scorer not in SCORERS:
            raise SelectionError(f"unknown scorer {self.scorer!r}; use one of {', '.join(SCORERS)}")
        if self.mode not in ROUTING_MODES:
            raise SelectionError(f"unknown mode {self.mode!r}; use pruned or exact")
        if self.random_seed is not None and (self.adaptive or self.task is not None):
            raise SelectionError("a random selection takes neither --adaptive nor --task")

    def describe(self) -> str:
        source = "random" if self.random_seed is not None else self.task or "own pattern"
        parts = [self.budget.describe(), f"scorer={self.scorer}", f"pattern={source}", f"mode={self.mode}"]
        if self.adaptive:
            parts.append("adaptive")
        return ", ".join(parts)

    def to_json(self) -> dict[str, object]:
        return {
            "keep": self.budget.keep,
            "experts_per_layer": self.budget.experts_per_layer,
            "scorer": self.scorer,
            "task": self.task,
            "random_seed": self.random_seed,
            "adaptive": self.adaptive,
            "mode": self.mode,
        }


def selection_for(patterns: PatternSet, policy: SelectionPolicy, task: str) -> Selection:
    """The retained set (rows = MoE layers in order) that ``policy`` serves ``task`` with."""
    stats = patterns.general.stats
    if policy.random_seed is not None:
        num_layers, num_experts = stats.tcess.shape
        return random_selection(
            num_layers,
            num_experts,
            policy.budget,
            policy.random_seed,
            stats.top_k,
            always_keep=patterns.required_experts(),
        )
    if policy.scorer == "general":
        return patterns.select(GENERAL, policy.budget, adaptive=policy.adaptive)
    return patterns.select(policy.task or task, policy.budget, adaptive=policy.adaptive, score=policy.scorer)


@dataclass(frozen=True, slots=True)
class RetrievedEval:
    """Accuracy when each prompt is served with its retrieved pattern, and how often retrieval was right.

    ``retrieved[task]`` counts, per retrieved task, the prompts of ``task`` sent to it.
    """

    result: EvalResult
    retrieval_correct: dict[str, int]
    retrieved: dict[str, dict[str, int]]

    @property
    def retrieval_accuracy(self) -> float:
        total = sum(score.n for score in self.result.tasks.values())
        return sum(self.retrieval_correct.values()) / total if total else 0.0

    def to_json(self) -> dict[str, object]:
        document = self.result.to_json()
        for name, entry in document["tasks"].items():
            entry["retrieval_accuracy"] = self.retrieval_correct[name] / max(self.result.tasks[name].n, 1)
            entry["retrieved"] = self.retrieved[name]
        document["retrieval_accuracy"] = self.retrieval_accuracy
        return document


class SelectionEvaluator:
    """Evaluates ``suite`` on ``runtime`` under selections from ``patterns``; see the module docstring."""

    def __init__(
        self,
        runtime: MoERuntime,
        patterns: PatternSet,
        suite: Suite,
        *,
        split: str = "eval",
        limit: int | None = None,
        batch_size: int = 32,
        tasks: Sequence[str] | None = None,
    ) -> None:
        num_layers, num_experts = patterns.general.stats.tcess.shape
        layout = runtime.layout
        if (num_layers, num_experts) != (len(layout.moe_layers), layout.num_experts):
            raise PatternError(
                f"patterns of {num_layers} layers x {num_experts} experts do not fit the model "
                f"({len(layout.moe_layers)} MoE layers x {layout.num_experts}); re-run `taer calibrate`"
            )
        self.runtime = runtime
        self.patterns = patterns
        self.suite = suite
        self.split = split
        self.batch_size = batch_size
        names = list(tasks) if tasks is not None else suite.names
        examples = {name: self._labelled(name)[:limit] for name in names}
        for name in [name for name in names if not examples[name]]:
            logger.warning("task %s has no labelled %s prompts; skipped", name, split)
        self.examples = {name: found for name, found in examples.items() if found}
        if not self.examples:
            raise TasksFileError(f"no task in the suite has labelled {split} prompts to evaluate")
        self.names = list(self.examples)
        self._memo: dict[tuple, TaskScore] = {}

    def _labelled(self, name: str) -> list[Example]:
        if name not in self.suite.tasks:
            raise UnknownTaskError(f"unknown task {name!r}; the suite has {', '.join(self.suite.names)}")
        return [e for e in self.suite.tasks[name].split(self.split) if e.answer is not None]

    @property
    def counts(self) -> dict[str, int]:
        """Prompts evaluated per task."""
        return {name: len(examples) for name, examples in self.examples.items()}

    def full(self) -> EvalResult:
        """Every expert resident, the model's own routing."""
        return self._result(lambda name: (None, "full"))

    def under(self, policy: SelectionPolicy) -> EvalResult:
        """Each task under the selection ``policy`` picks for it."""
        self._check_patterns(self.names if policy.task is None else [policy.task], policy)
        return self._result(lambda name: (selection_for(self.patterns, policy, name), policy.mode))

    def retrieved(self, policy: SelectionPolicy, retrieve: Retrieve) -> RetrievedEval:
        """Each prompt under the selection of the task ``retrieve`` picks for its query text."""
        queries = [e.query for name in self.names for e in self.examples[name]]
        tasks = retrieve(queries)
        if len(tasks) != len(queries):
            raise SelectionError(f"retrieval returned {len(tasks)} tasks for {len(queries)} queries")
        picked = iter(tasks)
        scores, correct, retrieved = {}, {}, {}
        for name in self.names:
            groups: dict[str, list[int]] = {}
            for i in range(len(self.examples[name])):
                groups.setdefault(next(picked), []).append(i)
            self._check_patterns([task for task in groups if task != EXACT], policy)
            total = 0
            for task, indices in groups.items():
                if task == EXACT:  # every expert resident here: exact mode is the full model
                    total += self._score(name, indices, None, "full").correct
                    continue
                selection = selection_for(self.patterns, policy, task)
                total += self._score(name, indices, selection, policy.mode).correct
            scores[name] = TaskScore(name, total, len(self.examples[name]))
            correct[name] = len(groups.get(name, []))
            retrieved[name] = {task: len(indices) for task, indices in sorted(groups.items())}
        return RetrievedEval(EvalResult(scores), correct, retrieved)

    def _result(self, plan: Callable[[str], tuple[Selection | None, str]]) -> EvalResult:
        scores = {}
        for name in self.names:
            selection, mode = plan(name)
            scores[name] = self._score(name, range(len(self.examples[name])), selection, mode)
        return EvalResult(scores)

    def _score(self, name: str, indices: Sequence[int], selection: Selection | None, mode: str) -> TaskScore:
        examples = self.examples[name]
        whole = len(indices) == len(examples)
        key = (
            name,
            None if whole else tuple(indices),
            None if selection is None else tuple(selection.experts_by_layer.items()),
            mode,
        )
        if key not in self._memo:
            group = examples if whole else [examples[i] for i in indices]
            self._memo[key] = self._run(name, group, selection, mode)
        return self._memo[key]

    def _run(self, name: str, examples: list[Example], selection: Selection | None, mode: str) -> TaskScore:
        if selection is None:
            self.runtime.activate_all()
        else:
            self.runtime.activate(to_layers(selection, self.runtime.layout.moe_layers), mode)
        suite = Suite({name: TaskData(name, **{self.split: tuple(examples)})})
        result = evaluate(
            self.runtime.model,
            self.runtime.tokenizer,
            suite,
            split=self.split,
            batch_size=self.batch_size,
            progress=False,
        )
        return result.tasks[name]

    def _check_patterns(self, names: Sequence[str], policy: SelectionPolicy) -> None:
        if policy.random_seed is not None or policy.scorer == "general":
            return
        missing = [name for name in names if name not in self.patterns]
        if missing:
            raise UnknownTaskError(
                f"no pattern for task(s) {', '.join(missing)}; the patterns hold "
                f"{', '.join([*self.patterns.tasks, GENERAL])}: calibrate with the same tasks file"
            )


Matcher = Literal["semantic", "router"]


def make_retriever(
    matcher: Matcher,
    runtime: MoERuntime,
    patterns_dir: Path,
    tasks_file: Path,
    *,
    index_dir: Path | None = None,
    encoder: Path | None = None,
) -> Retrieve:
    """Query texts -> task names with the semantic index (``PATTERNS_DIR/index``) or the paper's
    router matcher (signatures under ``PATTERNS_DIR/router_matcher``, built from ``tasks_file``'s
    calibration prompts on first use)."""
    if matcher == "semantic":
        from retrieval.build import INDEX_SUBDIR
        from retrieval.encoder import Encoder
        from retrieval.index import TaskIndex

        index = TaskIndex.load(index_dir or Path(patterns_dir) / INDEX_SUBDIR, Encoder.load(encoder))
        return lambda texts: [result.task for result in index.query(list(texts))]
    if matcher == "router":
        from evaluation.router_matcher import RouterMatcher, ensure_router_signatures
        from retrieval.tasks_file import load_tasks_file

        signatures = ensure_router_signatures(runtime, patterns_dir, load_tasks_file(tasks_file))
        router = RouterMatcher(runtime, signatures)
        return lambda texts: [match.task for match in router.match(texts)]
    raise SelectionError(f"unknown matcher {matcher!r}; use semantic or router")
