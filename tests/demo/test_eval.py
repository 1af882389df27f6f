"""`evaluate` and `taer eval`: the documented JSON shape, the per-task hook, clear errors."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from demo.evaluate import evaluate
from demo.suite import Example, Suite, TaskData, load_suite
from server.cli import main


def test_eval_json_has_the_documented_shape(tiny_build, capsys):
    code = main(["eval", str(tiny_build.model_dir), "--json", "--limit", "3", "--batch-size", "2"])
    assert code == 0
    out = capsys.readouterr().out
    document = json.loads(out)
    assert set(document) == {"tasks", "mean"}
    names = load_suite(tiny_build.tasks_file).names
    assert list(document["tasks"]) == names
    for entry in document["tasks"].values():
        assert set(entry) == {"accuracy", "n"} and entry["n"] == 3 and 0.0 <= entry["accuracy"] <= 1.0
    mean = sum(e["accuracy"] for e in document["tasks"].values()) / len(names)
    assert document["mean"] == pytest.approx(mean)


def test_eval_table_and_explicit_tasks_file(tiny_build, capsys):
    args = ["eval", str(tiny_build.model_dir), "--tasks", str(tiny_build.tasks_file), "--limit", "1"]
    assert main([*args, "--split", "heldout"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["task", "accuracy", "n"] and lines[-1].startswith("mean")
    assert len(lines) == len(load_suite(tiny_build.tasks_file).names) + 2


def test_eval_errors_are_one_line(tmp_path, tiny_build, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "--tasks" in capsys.readouterr().err
    (tmp_path / "manifest.json").write_text("{}")
    assert main(["eval", str(tmp_path), "--tasks", str(tiny_build.tasks_file)]) == 2
    assert "runtime" in capsys.readouterr().err


def test_evaluate_scores_exactly_and_calls_the_hook_per_task(tiny_build):
    model = AutoModelForCausalLM.from_pretrained(tiny_build.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_build.model_dir)
    prompts = [Example.from_query(f"Add {i} and 1.", "?") for i in range(3)]
    suite = Suite(
        {"right": TaskData("right", eval=tuple(prompts)), "other": TaskData("other", eval=prompts[:1])}
    )
    calls = []
    first = evaluate(model, tokenizer, suite, before_task=calls.append, progress=False, batch_size=2)
    assert calls == ["right", "other"]
    assert first.tasks["right"].n == 3 and first.tasks["other"].n == 1
    # Score the model against its own greedy answers: every one must count as right.
    from demo.evaluate import generate_answers

    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=5, batch_size=2)
    own = Suite(
        {
            "own": TaskData(
                "own",
                eval=tuple(Example.from_query(e.query, a) for e, a in zip(prompts, answers, strict=True)),
            )
        }
    )
    assert evaluate(model, tokenizer, own, progress=False, batch_size=3).tasks["own"].accuracy == 1.0
