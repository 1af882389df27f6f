"""The DeepSeek-V3-family demo build: what :func:`demo.build.build_demo` runs for ``--family deepseek_v3``.

The same on-disk layout, stamp and caching as the default demo; the spec's key names the family and
the task set, so it never matches (or replaces silently) a default build's stamp.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from demo.deepseek import DeepseekModelConfig, build_deepseek_model
from demo.deepseek_train import DeepseekTrainConfig, train_deepseek
from demo.evaluate import evaluate
from demo.experts import grouped_experts
from demo.suite import SuiteSizes, generate_suite, write_suite
from demo.tasks_extended import task_set
from demo.tokenizer import build_tokenizer

FAMILY = "deepseek_v3"
# Bump whenever the tasks, tokenizer or training code change what a DeepSeek-V3 build produces.
DEEPSEEK_BUILD_VERSION = 1
DEEPSEEK_DEFAULT_OUT = Path(".taer/demo-deepseek_v3")


@dataclass(frozen=True, slots=True)
class DeepseekBuildSpec:
    """Everything that determines a DeepSeek-V3-family build."""

    seed: int = 0
    task_set: str = "extended"
    model: DeepseekModelConfig = field(default_factory=DeepseekModelConfig)
    train: DeepseekTrainConfig = field(default_factory=DeepseekTrainConfig)
    sizes: SuiteSizes = field(default_factory=SuiteSizes)

    def __post_init__(self) -> None:
        task_set(self.task_set)  # an unknown name fails here, not after training

    def key(self) -> dict[str, object]:
        return {
            "family": FAMILY,
            "version": DEEPSEEK_BUILD_VERSION,
            "seed": self.seed,
            "steps": self.train.base.steps,
            **asdict(self),
        }

    def build_into(self, work: Path, progress: bool) -> dict[str, object]:
        """Train, save the checkpoint and the suite under ``work``, evaluate; returns the stamp."""
        started = time.perf_counter()
        torch.manual_seed(self.seed)
        tokenizer = build_tokenizer()
        specs = task_set(self.task_set)
        model = build_deepseek_model(self.model, tokenizer)
        trained = train_deepseek(
            model,
            tokenizer,
            seed=self.seed,
            config=self.train,
            task_specs=specs,
            sizes=self.sizes,
            progress=progress,
        )
        model.save_pretrained(work / "model")
        tokenizer.save_pretrained(work / "model")
        suite = generate_suite(self.seed, self.sizes, specs)
        write_suite(suite, work / "tasks")
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(self.train.base.num_threads)
        try:
            # Numerically the model's own experts forward, without its per-expert zero-filled loop.
            with grouped_experts(model):
                result = evaluate(model, tokenizer, suite, progress=progress)
        finally:
            torch.set_num_threads(previous_threads)
        biases = [
            layer.mlp.gate.e_score_correction_bias
            for layer in model.model.layers[self.model.first_dense_layers :]
        ]
        return {
            **self.key(),
            "train_seconds": round(trained.seconds, 1),
            "build_seconds": round(time.perf_counter() - started, 1),
            "final_loss": trained.mean_loss(-50, None),
            # The routers' worst max-load / mean-load per step, over the last 50 steps.
            "final_imbalance": sum(trained.aux_losses[-50:]) / len(trained.aux_losses[-50:]),
            "bias_abs_max": max(float(b.abs().max()) for b in biases),
            "eval": result.to_json(),
        }
