"""TASKS.yaml: the tasks to calibrate, each with its calibration prompts.

    tasks:
      math: data/math.jsonl                  # short form: the calibration file
      code:
        calibration: data/code.jsonl
        examples: ["write a python function that ..."]   # extra queries for the retrieval index
        eval: data/code_eval.jsonl
        heldout: data/code_heldout.jsonl

A top-level mapping without the ``tasks:`` key is read as the tasks themselves. Paths are relative to
the YAML file. A calibration file is JSONL, one object a line: ``{"prompt": ...}``, ``{"prompt": ...,
"response": ...}`` or ``{"messages": [{"role": ..., "content": ...}, ...], "response": ...}`` (the
response is optional); or a ``.txt`` file with one prompt per line. Blank lines are skipped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from expert_store.errors import TasksFileError

GENERAL = "general"
# ``general`` is the pooled pattern; ``full`` and ``exact`` name the serving modes a client may ask for
# in the same field as a task, so none of them can be a task.
RESERVED_NAMES: frozenset[str] = frozenset({GENERAL, "full", "exact"})
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_TASK_KEYS = frozenset({"calibration", "examples", "eval", "heldout"})
_LINE_KEYS = frozenset({"prompt", "messages", "response"})
_MESSAGE_KEYS = frozenset({"role", "content"})


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class CalibrationPrompt:
    """One calibration example: a plain ``prompt`` or chat ``messages`` (exactly one), and a ``response``."""

    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None
    response: str | None = None

    @property
    def query_text(self) -> str:
        """The text retrieval embeds: the last user message, or the prompt."""
        if self.messages is None:
            assert self.prompt is not None
            return self.prompt
        return next(m.content for m in reversed(self.messages) if m.role == "user")

    def chat_messages(self) -> list[dict[str, str]] | None:
        """The messages as dicts, ready for a tokenizer's chat template (None for a plain prompt)."""
        return (
            None if self.messages is None else [{"role": m.role, "content": m.content} for m in self.messages]
        )


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """A task: its calibration prompts, extra example queries, and optional eval/held-out files."""

    name: str
    calibration: tuple[CalibrationPrompt, ...]
    examples: tuple[str, ...] = ()
    eval_path: Path | None = None
    heldout_path: Path | None = None


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a key given twice (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # the base class reports unhashable keys itself
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def check_task_name(name: object, where: str = "task name") -> str:
    """``name`` if it can name a task (letters, digits, ``_.-``; not reserved), else TasksFileError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise TasksFileError(f"{where}: {name!r} is not a valid task name (letters, digits, '_', '.', '-')")
    if name.lower() in RESERVED_NAMES:
        raise TasksFileError(
            f"{where}: {name!r} is reserved ({', '.join(sorted(RESERVED_NAMES))}); rename it"
        )
    return name


def load_tasks_file(path: str | Path) -> list[TaskSpec]:
    """Parse a TASKS.yaml and every calibration file it names, in the file's order."""
    path = Path(path).absolute()  # the calibration paths we return stay valid if the caller changes directory
    if not path.is_file():
        raise TasksFileError(f"tasks file {path} not found")
    try:
        document = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise TasksFileError(f"{path}: not valid YAML: {error}") from None
    entries = _task_entries(document, path)
    return [_task_spec(name, entry, path) for name, entry in entries.items()]


def load_calibration_file(path: Path) -> tuple[CalibrationPrompt, ...]:
    """Read a ``.jsonl`` or ``.txt`` calibration file; errors name the file and line."""
    if not path.is_file():
        raise TasksFileError(f"calibration file {path} not found")
    if path.suffix not in (".jsonl", ".txt"):
        raise TasksFileError(f"{path}: calibration files must be .jsonl or .txt")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise TasksFileError(f"{path}: not UTF-8 text: {error}") from None
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        prompts.append(
            _parse_line(line, where) if path.suffix == ".jsonl" else CalibrationPrompt(prompt=line)
        )
    if not prompts:
        raise TasksFileError(f"{path}: no calibration prompts; a task needs at least one")
    return tuple(prompts)


def _task_entries(document: Any, path: Path) -> dict[str, Any]:
    if not isinstance(document, dict):
        raise TasksFileError(f"{path}: expected a mapping with a 'tasks:' key, got {type(document).__name__}")
    if "tasks" in document and isinstance(document["tasks"], dict | None):
        if unknown := set(document) - {"tasks"}:
            raise TasksFileError(f"{path}: unknown top-level keys {sorted(unknown)}; only 'tasks' is allowed")
        document = document["tasks"] or {}
    if not document:
        raise TasksFileError(f"{path}: no tasks defined")
    return document


def _task_spec(name: Any, entry: Any, yaml_path: Path) -> TaskSpec:
    check_task_name(name, where=f"{yaml_path}: task {name!r}")
    where = f"{yaml_path}: task {name!r}"
    if isinstance(entry, str):
        entry = {"calibration": entry}
    if not isinstance(entry, dict):
        raise TasksFileError(f"{where}: expected a path or a mapping, got {type(entry).__name__}")
    if unknown := set(entry) - _TASK_KEYS:
        raise TasksFileError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_TASK_KEYS)}")
    if "calibration" not in entry:
        raise TasksFileError(f"{where}: missing 'calibration' (the prompts file)")
    examples = entry.get("examples") or []
    if not isinstance(examples, list) or not all(isinstance(e, str) and e.strip() for e in examples):
        raise TasksFileError(f"{where}: 'examples' must be a list of non-empty strings")
    return TaskSpec(
        name=name,
        calibration=load_calibration_file(_resolve(entry["calibration"], yaml_path, f"{where}: calibration")),
        examples=tuple(examples),
        eval_path=_optional_file(entry.get("eval"), yaml_path, f"{where}: eval"),
        heldout_path=_optional_file(entry.get("heldout"), yaml_path, f"{where}: heldout"),
    )


def _resolve(value: Any, yaml_path: Path, where: str) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise TasksFileError(f"{where}: expected a file path, got {value!r}")
    return yaml_path.parent / Path(value).expanduser()


def _optional_file(value: Any, yaml_path: Path, where: str) -> Path | None:
    if value is None:
        return None
    resolved = _resolve(value, yaml_path, where)
    if not resolved.is_file():
        raise TasksFileError(f"{where}: file {resolved} not found")
    return resolved


def load_labelled_queries(path: Path) -> tuple[CalibrationPrompt, ...]:
    """The queries of a task's ``eval`` or ``heldout`` JSONL file (``{"messages"|"prompt", "answer"}``
    a line; the answer is not read here); errors name the file and line."""
    if not path.is_file():
        raise TasksFileError(f"labelled prompts file {path} not found")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise TasksFileError(f"{where}: malformed JSON: {error.msg}") from None
            if not isinstance(record, dict):
                raise TasksFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
            query = {key: record[key] for key in ("prompt", "messages") if key in record}
            prompts.append(_parse_line(json.dumps(query), where))
    return tuple(prompts)


def _parse_line(line: str, where: str) -> CalibrationPrompt:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise TasksFileError(f"{where}: malformed JSON: {error.msg}") from None
    if not isinstance(record, dict):
        raise TasksFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if unknown := set(record) - _LINE_KEYS:
        raise TasksFileError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_LINE_KEYS)}")
    if ("prompt" in record) == ("messages" in record):
        raise TasksFileError(f"{where}: give exactly one of 'prompt' or 'messages'")
    response = record.get("response")
    if response is not None and not isinstance(response, str):
        raise TasksFileError(f"{where}: 'response' must be a string")
    if "prompt" in record:
        if not isinstance(record["prompt"], str) or not record["prompt"].strip():
            raise TasksFileError(f"{where}: 'prompt' must be a non-empty string")
        return CalibrationPrompt(prompt=record["prompt"], response=response)
    return CalibrationPrompt(messages=_parse_messages(record["messages"], where), response=response)


def _parse_messages(messages: Any, where: str) -> tuple[ChatMessage, ...]:
    if not isinstance(messages, list) or not messages:
        raise TasksFileError(f"{where}: 'messages' must be a non-empty list")
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != _MESSAGE_KEYS:
            raise TasksFileError(f"{where}: message {i} must have exactly the keys 'role' and 'content'")
        if not isinstance(message["role"], str) or not isinstance(message["content"], str):
            raise TasksFileError(f"{where}: message {i}: 'role' and 'content' must be strings")
        parsed.append(ChatMessage(message["role"], message["content"]))
    if not any(m.role == "user" for m in parsed):
        raise TasksFileError(f"{where}: 'messages' has no user message to embed for retrieval")
    return tuple(parsed)
