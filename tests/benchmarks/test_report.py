"""`taer bench all` on tiny settings: report.md with the machine, every target, figures, and a failed
or missing benchmark reported instead of crashing the run. Memory at keep 100/25% in child processes."""

from __future__ import annotations

import argparse
import importlib
import sys
import types
from pathlib import Path

import pytest
from bench_fixtures import tiny_bench

from benchmarks.memory import render as render_memory
from benchmarks.memory import run_memory
from benchmarks.report import QUICK, Section, build_report, run_external
from benchmarks.report_text import render_report
from benchmarks.serving import BenchInputs
from server.cli import build_parser


@pytest.fixture(scope="module")
def bench():
    return tiny_bench()


def test_quick_report_with_a_missing_benchmark(bench, tmp_path, monkeypatch):
    real_import = importlib.import_module

    def without_retrieval(name, *args):
        if name == "benchmarks.retrieval":
            raise ModuleNotFoundError("No module named 'benchmarks.retrieval'", name=name)
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_retrieval)
    inputs = BenchInputs(bench.store, bench.patterns, bench.checkpoint, bench.tasks)
    path = build_report(tmp_path / "out", tmp_path, inputs, QUICK, ["policies", "retrieval"], explicit=True)
    report = path.read_text()
    assert path == tmp_path / "out" / "report.md"
    assert "cores" in report and "GiB RAM" in report and "(UTC)" in report and "qwen3_moe" in report
    assert "## 1. Policies at equal expert memory" in report
    assert "| policies | keep 50%: (a) tokens/s >= 3x (c) |" in report
    assert "**Not completed**: ModuleNotFoundError: No module named 'benchmarks.retrieval'" in report
    assert "targets met;" in report
    png = tmp_path / "out" / "policies.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![1. Policies at equal expert memory (demo model, same prompts)](policies.png)" in report
    assert (tmp_path / "out" / "policies.json").exists() and (tmp_path / "out" / "report.json").exists()


def test_run_external_retries_with_defaults(monkeypatch):
    module = types.ModuleType("fake_bench")

    def add_arguments(parser):
        parser.add_argument("--out", type=Path, default=Path("x"))

    def main(args):
        print(f"| table for {args.out} |")
        return 0

    module.add_arguments, module.main = add_arguments, main
    monkeypatch.setitem(sys.modules, "fake_bench", module)
    assert run_external("fake_bench", ["--out", "a"], []) == "| table for a |\n"
    assert run_external("fake_bench", ["--bogus", "1"], ["--out", "b"]) == "| table for b |\n"


def test_targets_summary_says_what_was_missed(bench):
    section = Section("policies", "1. Policies")
    section.targets = [
        {"target": "fast enough", "measured": 1.2, "bound": 1.0, "met": True},
        {"target": "three times faster", "measured": 1.1, "bound": 3.0, "met": False},
        {"name": "not run", "measured": None, "threshold": 0.9, "met": None},
    ]
    failed = Section("store", "5. Store", error="RuntimeError: boom")
    inputs = BenchInputs(bench.store, bench.patterns, None, bench.tasks)
    machine = {"cpu": "cpu-x", "cores": 2, "memory_gib": 4.0, "gpu": None, "torch": "t", "date": "2026-01-01"}
    text = render_report(machine, 61.0, inputs, QUICK, [section, failed])
    assert "cpu-x, 2 cores, 4.0 GiB RAM; GPU: none" in text and "2026-01-01" in text
    assert "1 of 3 targets met; 1 missed" in text
    assert "| policies | three times faster | 1.1 | **MISSED** |" in text
    assert "| policies | not run | not measured | not measured |" in text
    assert "- 5. Store: RuntimeError: boom" in text


def test_memory_at_keep_fractions(bench):
    result = run_memory(bench.store, bench.patterns, None, keeps=(1.0, 0.25))
    full, quarter = result["rows"]
    assert (full["slots_per_layer"], quarter["slots_per_layer"]) == (8, 2)
    assert quarter["resident_expert_bytes"] * 4 == full["resident_expert_bytes"] > 0
    assert quarter["experts_vs_keep_100"] == 0.25
    assert quarter["rss_bytes"] > quarter["model_bytes"] > 0
    assert "| taer keep 25% | 2 |" in render_memory(result)


def test_cli_registers_all_and_serving():
    parser = build_parser()
    args = parser.parse_args(["bench", "all", "--out", "somewhere", "--quick", "--sections", "policies"])
    assert args.func.__module__ == "benchmarks.report" and args.out == Path("somewhere") and args.quick
    args = parser.parse_args(["bench", "serving", "--parts", "server", "--clients", "1,4,8"])
    assert args.func.__module__ == "benchmarks.serving"
    assert isinstance(args, argparse.Namespace)
