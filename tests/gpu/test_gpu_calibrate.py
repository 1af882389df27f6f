"""Layer-streamed calibration on CUDA (the path for models larger than the device) against the
in-memory calibration on the CPU."""

from __future__ import annotations

import pytest
import torch
from test_calibrate import _store, _tasks  # the CPU test's tiny store and tasks

from retrieval.calibrate import CalibrationOptions, calibrate

pytestmark = pytest.mark.gpu

# Different kernels on different devices: float32 reassociation only, unless a token sits on a
# routing threshold, which random tiny models make unlikely.
TOL = 1e-4


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_streamed_calibration_on_device_equals_cpu(tmp_path, device, family):
    store, tasks = _store(tmp_path, family), _tasks(tmp_path)
    on_cpu = calibrate(store, tasks, tmp_path / "cpu", CalibrationOptions(batch_size=4))
    streamed = calibrate(
        store,
        tasks,
        tmp_path / "device",
        CalibrationOptions(batch_size=4, stream_layers=True, device=str(device)),
    )
    for task in ["add", "rev", "general"]:
        a, b = on_cpu.get(task).stats, streamed.get(task).stats
        assert a.num_tokens == b.num_tokens > 0
        for table in ("tcess", "frequency", "mean_prob"):
            assert torch.allclose(a.table(table), b.table(table), atol=TOL), (task, table)
