"""The tiny test pipeline (``tests/pipeline.py``) plus a labelled task suite for it.

The tiny model is random, so the suite's reference answers are the full model's own greedy outputs:
the full model scores every prompt on which it stops by itself (emits its end token), and a pruned
model scores less wherever pruning changes an answer. Evaluation and held-out prompts use wordings
that the calibration prompts (and so the retrieval index) never saw.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import TASK_PROMPTS, build_pipeline

from demo.evaluate import generate_answers
from demo.suite import Example, Suite, TaskData, write_suite
from expert_store.runtime import load_runtime

_WORDS = ("lemon", "tiger", "piano", "shelf", "grape", "candle", "mirror", "forest")


def _queries(split: str) -> dict[str, list[str]]:
    if split == "eval":
        return {
            "arithmetic": [f"What is {a} plus {a + 11}? Add the two numbers." for a in range(40, 48)],
            "reverse": [f"Reverse the letters of the word {w}." for w in _WORDS],
        }
    return {
        "arithmetic": [f"What is {a} plus {2 * a}? Add both of the numbers." for a in range(50, 58)],
        "reverse": [f"Reverse all the letters of the word {w}s." for w in _WORDS],
    }


def build_labelled_pipeline(root: Path) -> tuple[Path, Path, Path]:
    """(store, patterns, tasks.yaml of a suite with eval and held-out splits) under ``root``."""
    store, patterns = build_pipeline(root)
    runtime = load_runtime(store)
    runtime.activate_all()
    tasks = {}
    for name, calibration in TASK_PROMPTS.items():
        splits = {}
        for split in ("eval", "heldout"):
            prompts = [Example.from_query(q, None) for q in _queries(split)[name]]
            answers = generate_answers(runtime.model, runtime.tokenizer, prompts, max_new_tokens=8)
            splits[split] = tuple(
                Example.from_query(p.query, a) for p, a in zip(prompts, answers, strict=True)
            )
        tasks[name] = TaskData(
            name, calibration=tuple(Example.from_query(q, None) for q in calibration), **splits
        )
    runtime.close()
    return store, patterns, write_suite(Suite(tasks), root / "suite")
