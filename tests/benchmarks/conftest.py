"""The benchmarks set torch's thread count (process-wide, ``--threads``): each test here gets the
count it started with back, so later tests run as they would alone."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
