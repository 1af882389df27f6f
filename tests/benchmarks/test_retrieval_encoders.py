"""The encoder comparison of `taer bench retrieval --encoders`: accuracy, latency rounds, the choice."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch

from benchmarks import retrieval as retrieval_bench
from benchmarks.retrieval import OUT_OF_DOMAIN
from benchmarks.retrieval_encoders import choose_encoder, compare_encoders
from benchmarks.retrieval_render import render_encoders_markdown
from demo.suite import Example, Suite, TaskData, write_suite
from retrieval.encoder import Encoder

_WORDS = ("lemon", "tiger", "piano", "shelf", "grape", "candle")
WORDINGS = {
    "add": {
        "calibration": [f"What is {a} plus {a + 3}?" for a in range(10, 16)],
        "eval": [f"Add {a} and {a + 5}." for a in range(20, 24)],
        "heldout": [f"What do {a} and {a + 1} sum to?" for a in range(30, 34)],
    },
    "reverse": {
        "calibration": [f"Reverse the word {w}." for w in _WORDS],
        "eval": [f"Write {w} backwards." for w in _WORDS[:4]],
        "heldout": [f"Spell {w} in reverse order." for w in _WORDS[:4]],
    },
}


@pytest.fixture(scope="module")
def tasks_file(tmp_path_factory):
    tasks = {
        name: TaskData(
            name,
            **{
                split: tuple(Example.from_query(q, "x") for q in queries) for split, queries in splits.items()
            },
        )
        for name, splits in WORDINGS.items()
    }
    return write_suite(Suite(tasks), tmp_path_factory.mktemp("suite"))


@pytest.fixture(scope="module")
def minilm() -> Iterator[Encoder]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Encoder.load()
    torch.set_num_threads(threads)


def test_compare_encoders_measures_each_side_by_side(tasks_file, minilm):
    loaded = []

    def loader(spec: str) -> Encoder:
        loaded.append(spec)
        return minilm

    comparison = compare_encoders(
        ["minilm", "all-MiniLM-L6-v2"],
        tasks_file,
        OUT_OF_DOMAIN,
        rounds=2,
        calls=3,
        batch_sizes=(1, 2),
        sizes=(None, 300),
        loader=loader,
    )
    assert loaded == ["minilm", "all-MiniLM-L6-v2"]
    first, second = comparison["encoders"]
    assert first["fingerprint"] == str(minilm.fingerprint) and first["dim"] == 384
    assert first["parameters"] > 20e6 and first["weight_bytes"] > 80e6  # all-MiniLM-L6-v2: 22.7M, 90.9 MB
    assert first["index_size"] == 12
    for row in (first, second):
        assert row["heldout"] == {"accuracy": 1.0, "n": 8, "fallbacks": 0}
        assert row["eval"]["accuracy"] == 1.0
        assert row["ood_general"] >= 0.9
        assert row["fitted"]["ood_general"] >= 0.95
        assert [(t["size"], t["batch"]) for t in row["latency"]] == [(12, 1), (12, 2), (300, 1), (300, 2)]
        for timed in row["latency"]:
            assert len(timed["p50_ms"]) == len(timed["p99_ms"]) == 2  # one per round
            assert all(p50 <= p99 for p50, p99 in zip(timed["p50_ms"], timed["p99_ms"], strict=True))
    assert all(ratio == 1.0 for t in first["latency"] for ratio in t["p50_vs_first"])
    markdown = render_encoders_markdown(comparison)
    assert "| minilm | 384 |" in markdown and "Choice by this run" in markdown


def _row(name: str, heldout: float, p99s: list[float], ood: float = 1.0) -> dict:
    return {
        "encoder": name,
        "heldout": {"accuracy": heldout},
        "ood_general": ood,
        "latency": [{"size": 10_000, "batch": 1, "p99_ms": p99s}],
    }


def test_choice_needs_better_top1_within_the_latency_budget_in_every_round():
    baseline = _row("minilm", 0.80, [12.0, 18.0])
    assert choose_encoder([baseline, _row("fast", 0.70, [5.0])])["encoder"] == "minilm"
    assert choose_encoder([baseline, _row("as good", 0.80, [5.0])])["encoder"] == "minilm"  # a tie
    assert choose_encoder([baseline, _row("better", 0.92, [15.0, 19.9])])["encoder"] == "better"
    slow = choose_encoder([baseline, _row("slow", 0.92, [15.0, 31.0])])
    assert slow == {"encoder": "minilm", "within_budget": ["minilm"], "eligible": ["minilm"]}
    leaky = choose_encoder([baseline, _row("leaky", 0.95, [10.0], ood=0.15)])
    assert leaky["encoder"] == "minilm" and leaky["within_budget"] == ["minilm", "leaky"]
    over = choose_encoder([_row("minilm", 0.80, [25.0]), _row("fast", 0.70, [5.0])])
    assert over["encoder"] == "fast"  # the default itself over budget: the best that is within it
    assert choose_encoder([_row("minilm", 0.8, [25.0])])["encoder"] is None


def test_bench_retrieval_encoders_only(tasks_file, minilm, tmp_path, monkeypatch, capsys):
    from server.cli import main

    def quick(specs, tasks, out_of_domain, rounds):
        return compare_encoders(
            specs, tasks, out_of_domain, rounds, calls=2, sizes=(None,), loader=lambda s: minilm
        )

    monkeypatch.setattr(retrieval_bench, "compare_encoders", quick)
    out = tmp_path / "out"
    args = ["bench", "retrieval", "--encoders-only", "--encoders", "minilm", "--tasks", str(tasks_file)]
    assert main([*args, "--encoder-rounds", "1", "--out", str(out)]) == 0
    comparison = json.loads((out / "retrieval_encoders.json").read_text())
    assert [r["encoder"] for r in comparison["encoders"]] == ["minilm"]
    assert comparison["rounds"] == 1 and comparison["machine"]["cores"] >= 1
    assert (out / "retrieval_encoders.md").read_text() in capsys.readouterr().out
