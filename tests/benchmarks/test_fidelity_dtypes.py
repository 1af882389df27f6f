"""`taer bench fidelity --expert-dtypes`: the expert dtype column on the tiny labelled pipeline."""

from __future__ import annotations

import json

import pytest
from bench_fixtures import tiny_bench

from benchmarks.fidelity_dtypes import prepare_arm
from expert_store.manifest import MANIFEST_FILE, Manifest
from server.cli import main

KEEPS = (1.0, 0.25)
ARMS = ("bfloat16", "int8", "float8")


def _inputs() -> list[str]:
    bench = tiny_bench()
    return ["--store", str(bench.store), "--patterns", str(bench.patterns), "--tasks", str(bench.tasks)]


def _dtype_args(work) -> list[str]:
    keeps = [str(k) for k in KEEPS]
    return ["--expert-dtypes", "int8,float8", "--dtype-keeps", *keeps, "--dtype-work", str(work)]


def test_the_fidelity_report_gains_the_expert_dtype_column(tmp_path, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["bench", "fidelity", *_inputs(), "--keeps", "1.0", "--seeds", "0", "--limit", "3"]
    assert main([*args, *_dtype_args(work), "--out", str(out)]) == 0
    report = json.loads((out / "fidelity.json").read_text())
    assert (out / "fidelity_dtypes.png").stat().st_size > 0
    dtypes = report["dtypes"]
    layout = Manifest.load(tiny_bench().store).layout
    arms = {arm["expert_dtype"]: arm for arm in dtypes["arms"]}
    assert list(arms) == list(ARMS)  # bfloat16 measured first, as the baseline, though not asked for
    assert [arms[d]["slots_hold"] for d in ARMS] == ["bfloat16", "int8-channel", "float8-channel"]
    assert arms["bfloat16"]["bytes_per_expert"] == 2 * layout.params_per_expert
    scales = 4 * (2 * layout.intermediate_size + layout.hidden_size)  # a float32 per output row
    assert arms["int8"]["bytes_per_expert"] == arms["float8"]["bytes_per_expert"]
    assert arms["int8"]["bytes_per_expert"] == layout.params_per_expert + scales
    assert all(arm["calibrated_now"] for arm in arms.values())  # each store its own patterns
    rows = {(r["expert_dtype"], r["keep"]): r for r in dtypes["rows"]}
    assert list(rows) == [(d, k) for d in ARMS for k in KEEPS]
    for (expert_dtype, keep), row in rows.items():
        base = rows["bfloat16", keep]
        assert set(row["tasks"]) == {"arithmetic", "reverse"} and dtypes["n"] == {
            "arithmetic": 3,
            "reverse": 3,
        }
        assert row["mean"] == pytest.approx(sum(row["tasks"].values()) / 2)
        assert row["share_of_bfloat16"] == pytest.approx(row["mean"] / base["mean"])
        assert 0 <= row["same_sets_as_bfloat16"] <= 2
        if expert_dtype == "bfloat16":
            assert row["max_logit_diff_vs_bfloat16"] == 0 and row["same_sets_as_bfloat16"] == 2
            continue
        # 8 bits change the logits, by little: a sanity bound, not a tolerance (measured: mean
        # difference 0.0003-0.0004 against a spread of 0.12)
        assert row["max_logit_diff_vs_bfloat16"] > 0
        assert row["mean_logit_diff_vs_bfloat16"] < row["bfloat16_logit_std"] / 20
    assert rows["int8", 1.0]["same_sets_as_bfloat16"] == 2  # every expert kept: the same sets
    reference = dtypes["float32_reference"]  # the store under test is the checkpoint's, in float32
    assert [r["keep"] for r in reference] == list(KEEPS) and reference[0]["max_logit_diff_vs_bfloat16"] > 0
    dtype_targets = [t for t in report["targets"] if "experts at keep" in t["name"]]
    assert len(report["targets"]) == 4 + 4 and len(dtype_targets) == 4  # int8 and float8 at 2 keeps
    assert all(isinstance(t["met"], bool) for t in dtype_targets)
    markdown = (out / "fidelity.md").read_text()
    assert "| int8 | 25% | 2 | int8-channel |" in markdown and "For scale" in markdown
    assert markdown in capsys.readouterr().out

    # A second run reuses the stores and their patterns (each checked against its store's fingerprint).
    bench = tiny_bench()
    manifest = work / "store-int8" / MANIFEST_FILE
    written = manifest.stat().st_mtime_ns
    store, patterns, calibrated = prepare_arm(bench.checkpoint, bench.tasks, work, "int8", "cpu")
    assert (store, calibrated) == (work / "store-int8", False) and manifest.stat().st_mtime_ns == written
    assert patterns.fingerprint == Manifest.load(store).fingerprint != Manifest.load(bench.store).fingerprint


def test_dtypes_only_writes_its_own_report(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["bench", "fidelity", *_inputs(), "--limit", "2", "--expert-dtypes", "float8", "--dtypes-only"]
    assert (
        main([*args, "--dtype-keeps", "1.0", "--dtype-work", str(tmp_path / "work"), "--out", str(out)]) == 0
    )
    comparison = json.loads((out / "fidelity_dtypes.json").read_text())
    assert not (out / "fidelity.json").exists() and (out / "fidelity_dtypes.png").stat().st_size > 0
    assert [a["expert_dtype"] for a in comparison["arms"]] == ["bfloat16", "float8"]
    assert [t["name"] for t in comparison["targets"]] == [
        "float8 experts at keep 100% >= 99.5% of bfloat16 experts' mean accuracy"
    ]
    assert (out / "fidelity_dtypes.md").read_text() in capsys.readouterr().out


def test_unknown_expert_dtypes_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "fidelity", *_inputs(), "--expert-dtypes", "int8,int4"])
    assert "unknown expert dtype(s) ['int4']" in capsys.readouterr().err


def test_a_missing_checkpoint_is_refused_before_anything_runs(tmp_path, capsys):
    args = ["bench", "fidelity", *_inputs(), "--expert-dtypes", "int8", "--out", str(tmp_path / "out")]
    assert main([*args, "--checkpoint", str(tmp_path / "gone")]) == 2
    assert (
        "the checkpoint to shard per expert dtype, is not there; pass --checkpoint" in capsys.readouterr().err
    )
    assert not (tmp_path / "out").exists()  # the scorer table did not run first
