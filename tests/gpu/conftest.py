"""Fixtures of the GPU tests (``pytest tests/gpu``; each test is marked ``gpu`` and skipped by
tests/conftest.py without CUDA).

``TAER_GPU_TESTS_DEVICE=cpu`` runs these tests on the CPU instead: a dry run of their own logic on a
machine without a GPU (the CUDA-only checks skip themselves). It proves nothing about CUDA.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny

from expert_store.shard import shard_checkpoint

DEVICE_ENV = "TAER_GPU_TESTS_DEVICE"


def _dry_run() -> bool:
    return os.environ.get(DEVICE_ENV, "cuda") == "cpu"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """In a CPU dry run, lift the "needs a CUDA device" skip that tests/conftest.py put on these tests."""
    if not _dry_run():
        return
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.own_markers = [m for m in item.own_markers if not _is_cuda_skip(m)]


def _is_cuda_skip(mark: pytest.Mark) -> bool:
    return mark.name == "skip" and mark.kwargs.get("reason") == "needs a CUDA device"


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cpu" if _dry_run() else "cuda")


@pytest.fixture
def cuda_only(device: torch.device) -> None:
    if device.type != "cuda":
        pytest.skip("checks the CUDA path itself")


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, device):
    """family -> (float32 reference model on ``device``, store dir, checkpoint dir), built once."""
    built = {}

    def get(family: str):
        if family not in built:
            root = tmp_path_factory.mktemp(f"gpu-{family}")
            model = save_tiny(family, root / "ckpt")
            shard_checkpoint(root / "ckpt", root / "store")
            built[family] = (copy.deepcopy(model).to(device), root / "store", root / "ckpt")
        return built[family]

    return get
