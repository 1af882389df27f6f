"""A tiny demo build shared by the demo tests: seconds to train, same code path as the real one."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from demo.build import BuildResult, BuildSpec, build_demo
from demo.model import DemoModelConfig
from demo.suite import SuiteSizes
from demo.train import TrainConfig


@pytest.fixture(scope="session")
def tiny_model_config() -> DemoModelConfig:
    return DemoModelConfig(
        num_layers=2,
        hidden_size=32,
        num_heads=2,
        num_kv_heads=1,
        num_experts=4,
        experts_per_token=2,
        expert_intermediate_size=32,
    )


@pytest.fixture(scope="session")
def tiny_sizes() -> SuiteSizes:
    return SuiteSizes(calibration=4, eval=6, heldout=4, examples=2)


@pytest.fixture(scope="session")
def tiny_spec(tiny_model_config, tiny_sizes) -> Callable[..., BuildSpec]:
    def make(steps: int = 12, seed: int = 0) -> BuildSpec:
        train = TrainConfig(steps=steps, batch_size=12, warmup_steps=2, num_threads=1)
        return BuildSpec(seed=seed, model=tiny_model_config, train=train, sizes=tiny_sizes)

    return make


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory, tiny_spec) -> BuildResult:
    return build_demo(tmp_path_factory.mktemp("demo") / "out", spec=tiny_spec(), progress=False)
