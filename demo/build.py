"""Building the embedded default: the task suite and a small MoE trained on it, cached on disk.

Layout of the output directory::

    model/        an ordinary Hugging Face checkpoint (config, safetensors, tokenizer, chat template)
    tasks/        the task suite (tasks.yaml and its JSONL files, see demo.suite)
    build.json    the stamp: written last, so its presence means the build is complete

The build happens in a sibling temporary directory that is renamed into place at the end, so an
interrupted build never looks complete. A later call with the same settings returns at once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from demo.evaluate import evaluate
from demo.model import DemoModelConfig, build_model
from demo.suite import SuiteSizes, generate_suite, write_suite
from demo.tokenizer import build_tokenizer
from demo.train import TrainConfig, train
from expert_store.errors import StoreExistsError

logger = logging.getLogger(__name__)

# Bump whenever the tasks, tokenizer or training code change what a build produces.
BUILD_VERSION = 2
DEFAULT_OUT = Path(".taer/demo")
STAMP_NAME = "build.json"


@dataclass(frozen=True, slots=True)
class BuildSpec:
    """Everything that determines a build; two builds with equal specs produce the same files."""

    seed: int = 0
    model: DemoModelConfig = field(default_factory=DemoModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sizes: SuiteSizes = field(default_factory=SuiteSizes)

    def key(self) -> dict[str, object]:
        return {"version": BUILD_VERSION, "seed": self.seed, "steps": self.train.steps, **asdict(self)}

    def build_into(self, work: Path, progress: bool) -> dict[str, object]:
        """Train, save the checkpoint and the suite under ``work``, evaluate; returns the stamp."""
        return _build_into(work, self, progress)


class Buildable(Protocol):
    """A build spec: :class:`BuildSpec`, or another family's (``demo.deepseek_build``)."""

    def key(self) -> dict[str, object]: ...

    def build_into(self, work: Path, progress: bool) -> dict[str, object]: ...


@dataclass(frozen=True, slots=True)
class BuildResult:
    path: Path
    cached: bool
    stamp: dict[str, object]

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def tasks_file(self) -> Path:
        return self.path / "tasks" / "tasks.yaml"


def read_stamp(out: Path) -> dict[str, object] | None:
    """The stamp of a complete build in ``out``, or None."""
    try:
        return json.loads((out / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(out: Path) -> None:
    for partial in out.parent.glob(f".{out.name}.partial-*"):
        pid = partial.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _is_alive(int(pid)):
            logger.info("removing %s left by an interrupted build", partial)
            shutil.rmtree(partial, ignore_errors=True)


def _build_into(work: Path, spec: BuildSpec, progress: bool) -> dict[str, object]:
    started = time.perf_counter()
    torch.manual_seed(spec.seed)
    tokenizer = build_tokenizer()
    model = build_model(spec.model, tokenizer)
    trained = train(model, tokenizer, seed=spec.seed, config=spec.train, sizes=spec.sizes, progress=progress)
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    suite = generate_suite(spec.seed, spec.sizes)
    write_suite(suite, work / "tasks")
    result = evaluate(model, tokenizer, suite, progress=progress)
    return {
        **spec.key(),
        "train_seconds": round(trained.seconds, 1),
        "build_seconds": round(time.perf_counter() - started, 1),
        "final_loss": trained.mean_loss(-50, None),
        "eval": result.to_json(),
    }


def build_demo(
    out: str | Path = DEFAULT_OUT,
    *,
    spec: Buildable | None = None,
    force: bool = False,
    progress: bool = True,
) -> BuildResult:
    """Build the demo model and task suite into ``out``, or return the complete build already there.

    A previous complete build with another spec is replaced; a directory that is not a demo build is
    only replaced with ``force``.
    """
    out, spec = Path(out), spec or BuildSpec()
    stamp = read_stamp(out)
    if stamp is not None and not force and {k: stamp.get(k) for k in spec.key()} == spec.key():
        logger.info("demo model already built in %s", out)
        return BuildResult(out, cached=True, stamp=stamp)
    if out.exists() and stamp is None and not force:
        raise StoreExistsError(f"{out} exists but holds no complete demo build; pass --force to replace it")
    # Builds of the default family carry no "family" in their stamp.
    built_family, wanted_family = (d.get("family", "qwen3_moe") for d in (stamp or {}, spec.key()))
    if stamp is not None and not force and built_family != wanted_family:
        raise StoreExistsError(
            f"{out} holds the {built_family} demo, not the {wanted_family} one; pass --force to replace it "
            "or choose another directory"
        )
    if stamp is not None and not force:
        logger.info("the build in %s has other settings (seed, steps or version); rebuilding", out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    work = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        work.mkdir()
        stamp = spec.build_into(work, progress)
        (work / STAMP_NAME).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            # A directory cannot be renamed over a non-empty one: move the old build aside first.
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            shutil.rmtree(old)
        work.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mean = stamp["eval"]["mean"]
    logger.info(
        "built the demo model in %s (%.0f s, mean accuracy %.1f%%)", out, stamp["build_seconds"], 100 * mean
    )
    return BuildResult(out, cached=False, stamp=stamp)
