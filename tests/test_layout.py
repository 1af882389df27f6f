"""The layout rule that product packages hold only what serving needs: importing any product module
loads no test double, benchmark or evaluation code (``taer eval`` and ``taer bench`` import theirs
only when they run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
PRODUCT = ("expert_store", "retrieval", "server", "demo")
NOT_PRODUCT = ("evaluation", "benchmarks", "tests", "fake_engine", "api_helpers", "engine_helpers")

_SCRIPT = """
import importlib, json, pkgutil, sys
names = []
for package in {product!r}:
    module = importlib.import_module(package)
    names.append(package)
    for info in pkgutil.walk_packages(module.__path__, package + "."):
        if info.name.endswith("__main__"):
            continue  # runs the CLI
        importlib.import_module(info.name)
        names.append(info.name)
print(json.dumps({{"imported": names, "loaded": sorted(sys.modules)}}))
"""


def test_product_modules_import_no_test_benchmark_or_evaluation_code():
    script = _SCRIPT.format(product=PRODUCT)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600, check=True
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "server.engine" in report["imported"] and "retrieval.service" in report["imported"]
    leaked = [m for m in report["loaded"] if m.split(".")[0] in NOT_PRODUCT]
    assert leaked == []


def test_no_test_double_or_evaluation_code_in_product_packages():
    for package in PRODUCT:
        names = {path.stem for path in (ROOT / package).rglob("*.py")}
        assert not names & {"fake_engine", "router_matcher", "pruned_eval"}, package


def test_test_modules_have_unique_basenames():
    # The test folders are rootless (no __init__.py): two modules of one basename stop pytest's
    # collection of the whole suite ("import file mismatch").
    seen: dict[str, Path] = {}
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        assert path.name not in seen, f"{path} and {seen[path.name]} share a basename"
        seen[path.name] = path


def test_serving_without_replicas_imports_no_ray():
    # `taer serve` without --replicas: the CLI and everything its single-process path imports.
    script = (
        "import sys, server.cli, server.cli.serve, server.app, server.engine, server.loading, server.shutdown\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600, check=True
    )
    assert result.stdout.strip() == "[]"
