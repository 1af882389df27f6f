"""Smoke test of `taer bench discover` on the tiny labelled pipeline: all three parts, the report's files."""

from __future__ import annotations

import json

import pytest
from labelled_pipeline import build_labelled_pipeline

from server.cli import main


def test_bench_discover_finds_the_tiny_suites_tasks(tmp_path, capsys):
    store, patterns, tasks = build_labelled_pipeline(tmp_path / "pipeline")
    out = tmp_path / "out"
    inputs = ["--store", str(store), "--patterns", str(patterns), "--tasks", str(tasks), "--out", str(out)]
    # 12 calibration prompts a task: a task of fewer than 7 would be one wording's worth.
    sizes = ["--splits", "calibration", "eval", "--seeds", "0", "1", "--min-size", "7"]
    refine = ["--refine-seeds", "0", "--refine-weights", "0.5", "--refine-keep", "0.5"]
    assert main(["bench", "discover", *inputs, *sizes, "--limit", "2", "--keeps", "0.5", *refine]) == 0
    report = json.loads((out / "discover.json").read_text())
    assert (out / "discover.md").read_text() in capsys.readouterr().out
    calibration = [run for run in report["runs"] if run["split"] == "calibration"]
    assert [run["seed"] for run in calibration] == [0, 1]
    for run in calibration:
        assert run["clusters"] == 2 and run["true_tasks"] == 2 and run["prompts"] == 24 + 20
        assert run["ari_task_prompts"] == 1.0 and run["purity"] == 1.0
        assert run["task_prompts_to_general"] == 0
        assert run["unrelated"] == 20 and run["unrelated_to_general"] >= 18  # measured 20
        assert {found["task"] for found in run["found"].values()} == {"arithmetic", "reverse"}
    eval_runs = [run for run in report["runs"] if run["split"] == "eval"]
    assert [(run["prompts"], run["clusters"]) for run in eval_runs] == [(16 + 20, 2)] * 2
    (row,) = report["accuracy"]["rows"]
    assert row["keep"] == 0.5 and report["accuracy"]["prompts_per_task"] == {"arithmetic": 2, "reverse": 2}
    assert 0.0 <= row["discovered"] <= 1.0 and 0.0 <= row["labelled"] <= 1.0
    assert row["discovered_minus_labelled_points"] == pytest.approx(
        100 * (row["discovered"] - row["labelled"])
    )
    (run,) = report["refine"]["runs"]
    assert run["serving"]["requests"] == run["serving"]["recorded"] == 12  # half of 12 prompts a task
    assert [row["patterns"] for row in run["rows"]] == ["half", "refined w=0.5", "full"]
    assert run["rows"][-1]["tcess_gap_to_full"] == 0.0 and run["rows"][-1]["retained_shared_with_full"] == 1.0
    assert set(run["moved"]["0.5"]) <= {"arithmetic", "reverse", "general"} and run["moved"]["0.5"]
    assert "Refinement from served requests" in (out / "discover.md").read_text()
    names = [target["name"] for target in report["targets"]]
    assert names[0].startswith("ARI >= 0.9 on the calibration prompts") and report["targets"][0]["met"]
    assert len(names) == 3 and names[2].startswith("refined patterns (w=0.5)")


def test_accuracy_needs_the_calibration_split(tmp_path, capsys):
    args = ["bench", "discover", "--splits", "eval", "--out", str(tmp_path), "--data", str(tmp_path)]
    assert main(args) == 2
    assert "add that split or --no-accuracy" in capsys.readouterr().err
