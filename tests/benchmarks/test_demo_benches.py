"""Smoke tests of `taer bench fidelity` and `taer bench retrieval` on the tiny labelled pipeline."""

from __future__ import annotations

import json

import pytest
from labelled_pipeline import build_labelled_pipeline

from benchmarks.fidelity import SCORERS, fidelity_targets
from server.cli import main


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return build_labelled_pipeline(tmp_path_factory.mktemp("demo_benches"))


def _inputs(pipeline) -> list[str]:
    store, patterns, tasks = pipeline
    return ["--store", str(store), "--patterns", str(patterns), "--tasks", str(tasks)]


def test_bench_fidelity_writes_every_file(pipeline, tmp_path, capsys):
    out, report_path = tmp_path / "out", tmp_path / "fidelity.json"
    args = ["bench", "fidelity", *_inputs(pipeline), "--keeps", "1.0", "0.25", "0.125", "--limit", "3"]
    assert main([*args, "--seeds", "0", "1", "--json", str(report_path), "--out", str(out)]) == 0
    report = json.loads(report_path.read_text())
    for name in ("fidelity.md", "fidelity_accuracy.png", "tcess_heatmap.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "fidelity.png").exists() is False and not (out / "fidelity.json").exists()
    assert "dtypes" not in report and not (out / "fidelity_dtypes.png").exists()  # only with --expert-dtypes
    assert report["skipped_keeps"] == [0.125]  # 1 of 8 experts: fewer than top-2
    assert report["n"] == {"arithmetic": 3, "reverse": 3}
    assert [(r["keep"], r["scorer"]) for r in report["rows"]] == [
        (k, s) for k in (1.0, 0.25) for s in SCORERS
    ]
    full = report["full"]
    for row in report["rows"]:
        assert set(row["tasks"]) == {"arithmetic", "reverse"}
        assert row["mean"] == pytest.approx(sum(row["tasks"].values()) / 2)
        if row["keep"] == 1.0:  # every expert kept: the full model, whatever the scorer
            assert row["tasks"] == {name: t["accuracy"] for name, t in full["tasks"].items()}
    random_rows = [r for r in report["rows"] if r["scorer"] == "random"]
    assert all(len(r["runs"]) == 2 and r["same_sets_as_tcess"] is None for r in random_rows)
    assert set(report["tcess"]) == {"arithmetic", "reverse", "general"}
    assert len(report["tcess"]["reverse"]) == 3 and len(report["tcess"]["reverse"][0]) == 8
    names = [t["name"] for t in report["targets"]]
    assert len(names) == 4 and report["targets"][0]["met"] is None  # keep 50% was not measured
    markdown = (out / "fidelity.md").read_text()
    assert "| tcess_adaptive |" in markdown and "Targets:" in markdown
    assert markdown in capsys.readouterr().out


def test_fidelity_targets_read_the_right_cells():
    def row(scorer, keep, mean):
        return {"scorer": scorer, "keep": keep, "mean": mean, "relative": mean / 0.8, "same_sets_as_tcess": 0}

    rows = [
        row("tcess", 0.5, 0.796),
        row("tcess", 0.25, 0.70),
        row("frequency", 0.25, 0.70),
        row("random", 0.25, 0.3),
    ]
    targets = fidelity_targets(0.8, rows)
    assert [t["met"] for t in targets] == [True, True, False, True]
    assert targets[0]["measured"] == pytest.approx(0.995) and targets[2]["measured"] == pytest.approx(0.0)


def test_bench_retrieval_writes_the_report(pipeline, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["bench", "retrieval", *_inputs(pipeline), "--keeps", "0.5", "--limit", "2", "--out", str(out)]
    latency = ["--sizes", "200", "--latency-batch-sizes", "1", "--latency-queries", "4", "--kinds", "flat"]
    assert main([*args, *latency]) == 0
    report = json.loads((out / "retrieval.json").read_text())
    assert (out / "retrieval.md").read_text() in capsys.readouterr().out
    for matcher in ("semantic", "semantic_plain", "router"):
        top1 = report["top1"][matcher]
        assert top1["n"] == 16 and set(top1["tasks"]) == {"arithmetic", "reverse"}
        assert top1["accuracy"] == 1.0  # held-out wordings that resemble the calibration prompts
        assert report["matcher_latency"][matcher]["p50_ms"] > 0
    assert report["top1"]["semantic"]["in_index"] == 0  # held-out phrasings are never indexed
    for matcher in ("semantic", "semantic_plain"):
        # General questions (capitals, recipes, ...) are like neither task: most get `general`.
        assert report["top1"][matcher]["out_of_domain_general"] >= 0.8  # measured 0.95
    assert list(report["end_to_end"]) == ["heldout", "eval"]
    for part in report["end_to_end"].values():
        (row,) = part["rows"]
        assert row["keep"] == 0.5 and part["n"] == {"arithmetic": 2, "reverse": 2}
        for matcher in ("semantic", "semantic_plain", "router"):
            # Retrieval was perfect, so the retrieved patterns are the oracle's: the same accuracy.
            assert row[matcher]["mean"] == row["oracle"]["mean"]
            assert row[f"{matcher}_minus_oracle_points"] == 0 and row[matcher]["retrieval_accuracy"] == 1.0
    (check,) = report["router_check"]["rows"]
    assert check["keep"] == 0.5 and set(check["splits"]) == {"heldout", "eval"}
    for effect in check["splits"].values():
        assert effect["n"] == 16 and effect["checked"] == 16 and effect["top1_before"] == 1.0
        assert effect["wrong_retrievals"] == 0 and effect["caught"] is None
    assert check["out_of_domain"]["n"] == 20 and check["latency"]["n"] > 0
    assert check["latency"]["prefill_ms"] > 0 and check["latency"]["added_ms"] >= 0
    # Even random routers tell digits from letters: the check is on, and moves no right retrieval.
    assert check["on_when_serving"] and check["validated_on"] == "calibration prompts"
    for effect in check["splits"].values():
        assert effect["top1_after"] == 1.0 and effect["wrongly_moved"] == 0.0
    for part in report["end_to_end"].values():
        assert part["rows"][0]["semantic_checked"]["mean"] == part["rows"][0]["oracle"]["mean"]
    assert [r["size"] for r in report["latency"]["rows"]] == [200]
    met = {t["name"]: t["met"] for t in report["targets"]}
    assert met["semantic top-1 on held-out phrasings >= 95%"] is True
    assert met["single-query p99 <= 20 ms at 10,000 vectors"] is None  # no 10k index here
    assert "router check adds <= 5% of the prefill at keep 50%" in met
    assert "top-1 on held-out phrasings after the router check >= 95% at keep 50%" in met
    for split in ("heldout", "eval"):
        assert met[f"semantic-retrieved within 1 point of oracle at keep 50% ({split} prompts)"] is True
        assert met[f"checked within 1 point of oracle at keep 50% ({split} prompts)"] is True
