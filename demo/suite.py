"""The task suite on disk and in memory: disjoint splits, the tasks.yaml contract, and its loader.

Layout written by :func:`write_suite` (paths in the YAML are relative to it)::

    tasks.yaml                tasks: {NAME: {calibration: ..., eval: ..., heldout: ..., examples: [...]}}
    calibration/NAME.jsonl    {"messages": [{"role": "user", "content": ...}], "response": ...}
    eval/NAME.jsonl           {"messages": [...], "answer": ...}
    heldout/NAME.jsonl        {"messages": [...], "answer": ...}   (held-out phrasings only)

Splits are disjoint by problem (an :class:`~demo.tasks.Instance`), not just by wording; the training
stream (:mod:`demo.data`) never draws a problem reserved for calibration, evaluation or held-out use.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from demo.tasks import TASKS, Instance, TaskSpec
from expert_store.errors import TasksFileError

SPLITS = ("calibration", "eval", "heldout")


@dataclass(frozen=True, slots=True)
class SuiteSizes:
    """How many problems each task reserves per split, and how many example queries it lists."""

    calibration: int = 64
    eval: int = 100
    heldout: int = 40
    examples: int = 4


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class Example:
    """A prompt (chat messages) and its reference answer (``None`` for unlabelled calibration)."""

    messages: tuple[ChatMessage, ...]
    answer: str | None

    @classmethod
    def from_query(cls, query: str, answer: str | None) -> Example:
        return cls((ChatMessage("user", query),), answer)

    @property
    def query(self) -> str:
        """The last user message: what a retriever embeds."""
        return next(m.content for m in reversed(self.messages) if m.role == "user")

    def chat(self) -> list[dict[str, str]]:
        """The messages as ``apply_chat_template`` takes them."""
        return [{"role": m.role, "content": m.content} for m in self.messages]


@dataclass(frozen=True, slots=True)
class TaskData:
    """One task's prompts, split by use."""

    name: str
    calibration: tuple[Example, ...] = ()
    eval: tuple[Example, ...] = ()
    heldout: tuple[Example, ...] = ()
    examples: tuple[str, ...] = ()

    def split(self, name: str) -> tuple[Example, ...]:
        """The examples of split ``name`` (one of :data:`SPLITS`)."""
        if name not in SPLITS:
            raise TasksFileError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        return getattr(self, name)


@dataclass(frozen=True, slots=True)
class Suite:
    """Tasks by name, in file order."""

    tasks: dict[str, TaskData] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.tasks)


def _unique_instances(spec: TaskSpec, rng: random.Random, count: int) -> list[Instance]:
    seen: dict[tuple[tuple[str, str], ...], Instance] = {}
    for _ in range(count * 1000):
        if len(seen) == count:
            break
        instance = spec.sample(rng)
        seen.setdefault(instance.values, instance)
    assert len(seen) == count, f"task {spec.name} cannot draw {count} distinct problems"
    return list(seen.values())


def _worded(instances: Iterable[Instance], phrasings: tuple[str, ...]) -> tuple[Example, ...]:
    # Cycling the phrasings (not drawing them) keeps every wording equally represented in each split.
    return tuple(
        Example.from_query(instance.render(phrasings[i % len(phrasings)]), instance.answer)
        for i, instance in enumerate(instances)
    )


def reserved_problems(spec: TaskSpec, seed: int, sizes: SuiteSizes) -> dict[str, list[Instance]]:
    """The problems a task reserves for each split: deterministic from ``seed``, pairwise disjoint."""
    rng = random.Random(f"taer-demo:{seed}:{spec.name}:reserved")
    counts = {"calibration": sizes.calibration, "eval": sizes.eval, "heldout": sizes.heldout}
    pool = _unique_instances(spec, rng, sum(counts.values()))
    reserved, start = {}, 0
    for split, count in counts.items():
        reserved[split], start = pool[start : start + count], start + count
    return reserved


def generate_suite(
    seed: int = 0, sizes: SuiteSizes | None = None, task_specs: tuple[TaskSpec, ...] = TASKS
) -> Suite:
    """The demo suite for ``seed``: every task's calibration, evaluation and held-out prompts.

    ``task_specs`` defaults to the demo's six tasks; a task's prompts depend only on the seed and its
    own name, so a larger task set leaves the prompts of the tasks it shares unchanged.
    """
    sizes = sizes or SuiteSizes()
    tasks = {}
    for spec in task_specs:
        reserved = reserved_problems(spec, seed, sizes)
        rng = random.Random(f"taer-demo:{seed}:{spec.name}:examples")
        taken = {i.values for split in reserved.values() for i in split}
        examples = [i for i in _unique_instances(spec, rng, sizes.examples * 4) if i.values not in taken]
        tasks[spec.name] = TaskData(
            name=spec.name,
            calibration=_worded(reserved["calibration"], spec.phrasings),
            eval=_worded(reserved["eval"], spec.phrasings),
            heldout=_worded(reserved["heldout"], spec.heldout_phrasings),
            examples=tuple(e.query for e in _worded(examples[: sizes.examples], spec.phrasings)),
        )
    return Suite(tasks)


def _example_line(example: Example, answer_key: str) -> str:
    record = {"messages": example.chat(), answer_key: example.answer}
    return json.dumps(record, ensure_ascii=False)


def write_suite(suite: Suite, tasks_dir: Path) -> Path:
    """Write ``suite`` under ``tasks_dir`` in the tasks.yaml layout; returns the YAML's path."""
    entries = {}
    for task in suite.tasks.values():
        entry: dict[str, object] = {}
        for split in SPLITS:
            relative = f"{split}/{task.name}.jsonl"
            (tasks_dir / split).mkdir(parents=True, exist_ok=True)
            key = "response" if split == "calibration" else "answer"
            lines = [_example_line(e, key) for e in task.split(split)]
            (tasks_dir / relative).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
            entry[split] = relative
        entry["examples"] = list(task.examples)
        entries[task.name] = entry
    path = tasks_dir / "tasks.yaml"
    path.write_text(yaml.safe_dump({"tasks": entries}, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def _read_examples(path: Path) -> tuple[Example, ...]:
    if not path.is_file():
        raise TasksFileError(f"prompts file {path} does not exist; check the path in the tasks file")
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            messages = tuple(ChatMessage(m["role"], m["content"]) for m in record["messages"])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise TasksFileError(
                f"{path}:{number}: expected {{'messages': [{{'role', 'content'}}, ...]}} ({error})"
            ) from error
        answer = record.get("answer", record.get("response"))
        examples.append(Example(messages, None if answer is None else str(answer)))
    return tuple(examples)


def _task_entry(name: str, entry: object, base: Path) -> TaskData:
    if isinstance(entry, str):
        entry = {"calibration": entry}
    if not isinstance(entry, dict):
        raise TasksFileError(f"task {name!r}: expected a path or a mapping with a 'calibration' path")
    splits = {split: _read_examples(base / entry[split]) for split in SPLITS if entry.get(split)}
    examples = tuple(str(query) for query in entry.get("examples") or ())
    return TaskData(name=name, examples=examples, **splits)


def load_suite(path: str | Path) -> Suite:
    """Load a tasks file (``tasks.yaml``, or a directory holding one) into typed task data.

    A task may be a bare ``NAME: calibration.jsonl`` or a mapping with ``calibration``, ``eval``,
    ``heldout`` and ``examples``; missing splits are empty.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "tasks.yaml"
    if not path.is_file():
        raise TasksFileError(f"tasks file {path} does not exist; build the demo or pass a tasks.yaml")
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise TasksFileError(f"tasks file {path} is not valid YAML: {error}") from error
    if not isinstance(document, dict) or not isinstance(document.get("tasks"), dict) or not document["tasks"]:
        raise TasksFileError(f"tasks file {path} needs a non-empty 'tasks:' mapping of task name to prompts")
    tasks = {
        str(name): _task_entry(str(name), entry, path.parent) for name, entry in document["tasks"].items()
    }
    return Suite(tasks)
