"""TASKS.yaml parsing: every accepted shape, and each refusal naming the file, line and problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from expert_store.errors import TasksFileError
from retrieval.tasks_file import ChatMessage, load_tasks_file


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(*records: object) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def test_short_and_long_forms(tmp_path):
    write(
        tmp_path / "data/math.jsonl", jsonl({"prompt": "2+2="}, {"prompt": "3*4=", "response": "12"}) + "\n"
    )
    chat = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "reverse abc"},
            {"role": "assistant", "content": "cba"},
            {"role": "user", "content": "reverse xyz"},
        ],
        "response": "zyx",
    }
    write(tmp_path / "data/strings.jsonl", jsonl(chat))
    write(tmp_path / "data/sort.txt", "sort 3 1 2\n\nsort b a\n")
    write(tmp_path / "data/sort_eval.jsonl", jsonl({"prompt": "sort 9 8"}))
    yaml_path = write(
        tmp_path / "TASKS.yaml",
        "tasks:\n"
        "  math: data/math.jsonl\n"
        "  strings:\n"
        "    calibration: data/strings.jsonl\n"
        "  sort:\n"
        "    calibration: data/sort.txt\n"
        "    examples: [please sort these numbers, order the list]\n"
        "    eval: data/sort_eval.jsonl\n",
    )
    math, strings, sort = load_tasks_file(yaml_path)

    assert [t.name for t in (math, strings, sort)] == ["math", "strings", "sort"]
    assert [p.query_text for p in math.calibration] == ["2+2=", "3*4="]
    assert math.calibration[1].response == "12" and math.calibration[0].response is None
    assert math.eval_path is None and math.examples == ()

    (prompt,) = strings.calibration
    assert prompt.prompt is None and prompt.response == "zyx"
    assert prompt.messages[0] == ChatMessage("system", "be brief")
    assert prompt.query_text == "reverse xyz", "the last user message is what retrieval embeds"
    assert prompt.chat_messages()[2] == {"role": "assistant", "content": "cba"}

    assert [p.prompt for p in sort.calibration] == ["sort 3 1 2", "sort b a"]
    assert sort.examples == ("please sort these numbers", "order the list")
    assert sort.eval_path == tmp_path / "data/sort_eval.jsonl" and sort.heldout_path is None


def test_top_level_mapping_without_tasks_key(tmp_path):
    write(tmp_path / "a.txt", "hello\n")
    (task,) = load_tasks_file(write(tmp_path / "TASKS.yaml", "greet: a.txt\n"))
    assert task.name == "greet" and task.calibration[0].prompt == "hello"


BAD_CASES = {
    "missing calibration file": ("tasks:\n  math: nope.jsonl\n", r"calibration file .*nope.jsonl not found"),
    "empty task": ("tasks:\n  math: empty.jsonl\n", r"empty.jsonl: no calibration prompts"),
    "malformed json line": ("tasks:\n  math: broken.jsonl\n", r"broken.jsonl:2: malformed JSON"),
    "unknown key in a line": ("tasks:\n  math: extra.jsonl\n", r"extra.jsonl:1: unknown keys \['answer'\]"),
    "prompt and messages": ("tasks:\n  math: both.jsonl\n", r"both.jsonl:1: give exactly one of"),
    "no user message": ("tasks:\n  math: nouser.jsonl\n", r"nouser.jsonl:1: .*no user message"),
    "unknown task key": (
        "tasks:\n  math:\n    calibration: ok.jsonl\n    weight: 2\n",
        r"unknown keys \['weight'\]",
    ),
    "general is reserved": ("tasks:\n  general: ok.jsonl\n", r"'general' is reserved"),
    "no tasks": ("tasks: {}\n", r"no tasks defined"),
    "empty yaml": ("", r"expected a mapping"),
    "duplicate task": ("tasks:\n  math: ok.jsonl\n  math: ok.jsonl\n", r"duplicate key 'math'"),
    "bad task name": ("tasks:\n  my task: ok.jsonl\n", r"'my task' is not a valid task name"),
    "examples not a list": (
        "tasks:\n  math:\n    calibration: ok.jsonl\n    examples: hi\n",
        r"'examples' must be",
    ),
    "missing eval file": (
        "tasks:\n  math:\n    calibration: ok.jsonl\n    eval: gone.jsonl\n",
        r"eval: file .*gone",
    ),
    "no calibration key": ("tasks:\n  math:\n    eval: ok.jsonl\n", r"missing 'calibration'"),
    "unsupported extension": ("tasks:\n  math: data.csv\n", r"must be .jsonl or .txt"),
    "invalid yaml": ("tasks: [unclosed\n", r"not valid YAML"),
    "unknown top-level key": (
        "tasks:\n  math: ok.jsonl\nversion: 2\n",
        r"unknown top-level keys \['version'\]",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_files_are_refused_naming_the_problem(tmp_path, case):
    write(tmp_path / "ok.jsonl", jsonl({"prompt": "fine"}))
    write(tmp_path / "empty.jsonl", "\n\n")
    write(tmp_path / "broken.jsonl", jsonl({"prompt": "fine"}) + '{"prompt": "oops"\n')
    write(tmp_path / "extra.jsonl", jsonl({"prompt": "fine", "answer": "x"}))
    write(tmp_path / "both.jsonl", jsonl({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}))
    write(tmp_path / "nouser.jsonl", jsonl({"messages": [{"role": "system", "content": "b"}]}))
    write(tmp_path / "data.csv", "prompt\nhello\n")
    text, pattern = BAD_CASES[case]
    with pytest.raises(TasksFileError, match=pattern):
        load_tasks_file(write(tmp_path / "TASKS.yaml", text))


def test_missing_tasks_file(tmp_path):
    with pytest.raises(TasksFileError, match=r"tasks file .*TASKS.yaml not found"):
        load_tasks_file(tmp_path / "TASKS.yaml")
