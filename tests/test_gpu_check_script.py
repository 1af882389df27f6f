"""scripts/gpu_check.sh on the CPU (GPU_CHECK_DEVICE=cpu, tiny shapes): the script's own logic,
steps, outputs and exit status, with this interpreter instead of a fresh venv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "gpu_check.sh"


def _run(out: Path, work: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK_", "TAER_GPU_"))}
    environment |= {
        "GPU_CHECK_DEVICE": "cpu",
        "GPU_CHECK_PYTHON": sys.executable,
        "GPU_CHECK_WORK": str(work),
        "OMP_NUM_THREADS": "1",
        **env,
    }
    return subprocess.run(
        ["bash", str(SCRIPT), str(out)], env=environment, capture_output=True, text=True, timeout=120
    )


def test_dry_run_writes_the_benchmark_and_a_summary(tmp_path):
    out = tmp_path / "out"
    done = _run(out, tmp_path / "work", GPU_CHECK_STEPS="gpu-tests bench")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    store = json.loads((out / "store.json").read_text())
    assert store["device"] == "cpu"
    assert {"load", "switch", "decode"} <= store.keys() and "memory" not in store
    assert store["shape"]["num_experts"] == 8
    assert store["load"]["plain_copy_gbps"] > 0
    assert [row["slots_per_layer"] for row in store["decode"]["rows"]] == [8, 4]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] is True
    assert [(s["step"], s["status"]) for s in summary["steps"]] == [("gpu-tests", 0), ("bench", 0)]
    log = (out / "log.txt").read_text()
    assert log == done.stdout  # everything printed is in the log
    assert "skipped" in log  # the GPU tests were collected, and skip without CUDA
    assert "Greedy decoding" in log and "bench: ok" in log
    assert (out / "gpu-tests.xml").exists()


def test_a_failing_step_makes_the_script_fail_after_the_others_ran(tmp_path):
    out = tmp_path / "out"
    # pytest selecting no test exits with status 5; the next step must still run
    done = _run(
        out, tmp_path / "work", GPU_CHECK_STEPS="gpu-tests gpu-tests", GPU_CHECK_PYTEST_ARGS="-k no_such_test"
    )
    assert done.returncode != 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] is False
    assert [(s["step"], s["status"]) for s in summary["steps"]] == [("gpu-tests", 5), ("gpu-tests", 5)]
    assert "gpu-tests: FAILED (status 5)" in (out / "log.txt").read_text()


@pytest.mark.parametrize(
    ("args", "env"),
    [
        ([], {}),
        (["--help"], {}),
        (["OUT"], {"GPU_CHECK_DEVICE": "tpu"}),
        (["OUT"], {"GPU_CHECK_STEPS": "lint"}),
    ],
    ids=["no-out-dir", "help", "bad-device", "unknown-step"],
)
def test_bad_invocations_exit_with_status_2(tmp_path, args, env):
    environment = {**os.environ, "GPU_CHECK_PYTHON": sys.executable, **env}
    argv = ["bash", str(SCRIPT), *[str(tmp_path / a) if a == "OUT" else a for a in args]]
    done = subprocess.run(argv, env=environment, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
