"""`taer bench fallback` on the tiny labelled pipeline: each fallback serves the same traffic; the
out-of-domain questions go to it, and exact or full mode loads more expert bytes than the general
pattern."""

from __future__ import annotations

import json

from labelled_pipeline import build_labelled_pipeline

from server.cli import main


def test_each_fallback_serves_the_same_traffic(tmp_path, capsys):
    store, patterns, tasks = build_labelled_pipeline(tmp_path / "pipeline")
    report_path = tmp_path / "fallback.json"
    args = ["bench", "fallback", "--store", str(store), "--patterns", str(patterns), "--tasks", str(tasks)]
    assert (
        main([*args, "--split", "eval", "--limit", "3", "--max-tokens", "4", "--json", str(report_path)]) == 0
    )
    report = json.loads(report_path.read_text())
    rows = report["rows"]
    assert list(rows) == ["general", "exact", "full"]
    assert report["queries"]["in_domain"] == 6
    for name, row in rows.items():
        assert row["out_of_domain_to_fallback"] > 0, name
        assert row["modes"] == (["pruned"] if name == "general" else [name])
    assert rows["exact"]["bytes_loaded"] > rows["general"]["bytes_loaded"]
    assert rows["full"]["bytes_loaded"] > rows["general"]["bytes_loaded"]
    assert "| full |" in capsys.readouterr().out
