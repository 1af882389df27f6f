"""The task suite: deterministic, disjoint splits, held-out wording kept apart, exact scorers."""

from __future__ import annotations

import random
import re
from string import ascii_lowercase

import pytest

from demo.data import TrainingStream
from demo.suite import SPLITS, SuiteSizes, generate_suite, load_suite, reserved_problems, write_suite
from demo.tasks import SCORERS, TASKS, TASKS_BY_NAME, exact_match, scorer_for
from demo.tokenizer import build_tokenizer
from expert_store.errors import TasksFileError

SIZES = SuiteSizes(calibration=16, eval=24, heldout=12, examples=3)


def _literal_parts(phrasing: str) -> list[str]:
    return [part for part in re.split(r"\{\w+\}", phrasing) if part.strip()]


def test_suite_shape():
    assert len(TASKS) >= 6
    for spec in TASKS:
        assert len(spec.phrasings) >= 4 and len(spec.heldout_phrasings) >= 2
    suite = generate_suite(0, SIZES)
    assert suite.names == [spec.name for spec in TASKS]
    for task in suite.tasks.values():
        assert (len(task.calibration), len(task.eval), len(task.heldout)) == (16, 24, 12)
        assert len(task.examples) == 3


def test_generation_is_deterministic_per_seed():
    assert generate_suite(7, SIZES) == generate_suite(7, SIZES)
    assert generate_suite(7, SIZES) != generate_suite(8, SIZES)


@pytest.mark.parametrize("spec", TASKS, ids=lambda spec: spec.name)
def test_splits_are_disjoint_and_training_avoids_them(spec):
    reserved = reserved_problems(spec, 0, SIZES)
    values = [{i.values for i in reserved[split]} for split in SPLITS]
    assert [len(v) for v in values] == [SIZES.calibration, SIZES.eval, SIZES.heldout]
    assert not (values[0] & values[1] or values[0] & values[2] or values[1] & values[2])
    stream = TrainingStream(build_tokenizer(), seed=0, batch_size=4, sizes=SIZES)
    drawn = {stream.draw(spec).values for _ in range(300)}
    assert not drawn & set().union(*values)


def test_answers_are_right():
    rng = random.Random(0)
    checks = {
        "reverse": lambda v: v["word"][::-1],
        "upper": lambda v: v["word"].upper(),
        "shift": lambda v: v["word"].translate(str.maketrans(ascii_lowercase, ascii_lowercase[1:] + "a")),
        "sort_digits": lambda v: "".join(sorted(v["digits"])),
        "max_digit": lambda v: str(max(int(d) for d in v["digits"])),
        "add": lambda v: str(int(v["a"]) + int(v["b"])),
    }
    assert set(checks) == set(TASKS_BY_NAME)
    for name, expected in checks.items():
        for _ in range(50):
            instance = TASKS_BY_NAME[name].sample(rng)
            assert instance.answer == expected(dict(instance.values)), (name, instance)


def test_heldout_phrasings_never_appear_outside_heldout():
    suite = generate_suite(0, SIZES)
    seen = [
        e.query for t in suite.tasks.values() for split in ("calibration", "eval") for e in t.split(split)
    ]
    seen += [query for t in suite.tasks.values() for query in t.examples]
    for spec in TASKS:
        for phrasing in spec.heldout_phrasings:
            longest = max(_literal_parts(phrasing), key=len)
            assert not [query for query in seen if longest in query], (spec.name, phrasing)
    for task in suite.tasks.values():
        for example in task.heldout:
            patterns = [
                re.escape(p).replace(r"\{", "{").replace(r"\}", "}")
                for p in TASKS_BY_NAME[task.name].heldout_phrasings
            ]
            regexes = [re.sub(r"\{\w+\}", ".+", p) for p in patterns]
            assert any(re.fullmatch(r, example.query) for r in regexes), example.query


def test_scorers_accept_right_and_reject_wrong():
    suite = generate_suite(0, SIZES)
    assert set(SCORERS) == set(suite.names)
    for name, task in suite.tasks.items():
        score = SCORERS[name]
        for example, other in zip(task.eval, task.eval[1:], strict=False):
            assert score(example.answer, example.answer)
            assert score(f" {example.answer}\n", example.answer)
            assert not score(example.answer + "0", example.answer)
            if other.answer != example.answer:
                assert not score(other.answer, example.answer)
    assert not exact_match("ABC", "abc")
    assert scorer_for("not-a-demo-task") is exact_match


def test_write_and_load_round_trip(tmp_path):
    suite = generate_suite(1, SIZES)
    path = write_suite(suite, tmp_path)
    assert path == tmp_path / "tasks.yaml"
    assert load_suite(tmp_path) == suite
    assert load_suite(path) == suite
    line = (tmp_path / "calibration" / "add.jsonl").read_text().splitlines()[0]
    assert set(__import__("json").loads(line)) == {"messages", "response"}


def test_load_accepts_bare_calibration_path_and_names_missing_files(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    (tmp_path / "tasks.yaml").write_text("tasks:\n  chat: c.jsonl\n  broken: {calibration: missing.jsonl}\n")
    with pytest.raises(TasksFileError, match="missing.jsonl"):
        load_suite(tmp_path)
    (tmp_path / "tasks.yaml").write_text("tasks:\n  chat: c.jsonl\n")
    task = load_suite(tmp_path).tasks["chat"]
    assert task.calibration[0].query == "hi" and task.calibration[0].answer is None and task.eval == ()
